"""CP attention programs for ``cpinspect check --reference``, and the single-process reference they must match.

Each program is ``fn(group, input_ids, cu_seqlens_padded, **_)``: it turns the rank's local token ids
into q/k/v through one seeded embedding table, runs one of :mod:`attention`'s CP attention programs
over the rank's zigzag shard (the physical boundaries ``cu_seqlens_padded`` are what CP cut) and
returns the rank's output ``[local_T, heads, dim]``. :func:`full_attention` is the reference: causal
attention inside each physical segment of the unsharded row, by torch's own
``scaled_dot_product_attention`` with a block mask (no CP code). Try::

    cpinspect check examples/cp_programs/check_attention.py:ring_program \\
        --reference examples/cp_programs/check_attention.py:full_attention --cp 2,3 --cases 12

:func:`allgather_kv_in_row_order` is a real CP bug: it treats the all-gathered keys as if they were
in row order, but the ranks' zigzag shards arrive rank by rank (chunks ``r`` and ``2*cp-1-r`` each),
so most queries attend to the wrong keys; check names the first wrong token of each rank.

At cp 1 (nothing is split, segments may be odd) every program attends over its whole row directly.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.functional import scaled_dot_product_attention


def _load_attention():
    name = "cpinspect_example_cp_attention"  # by path: a bare `import attention` could find another module
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("attention.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


attention = _load_attention()

HEADS, DIM, VOCAB = 24, 4, 4096  # Ulysses needs the heads divisible by cp: 24 = every cp of 1, 2, 3, 4, 6, 8
_TABLE = torch.randn(VOCAB, 3, HEADS, DIM, generator=torch.Generator().manual_seed(0))


def token_qkv(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[n, heads, dim]`` (float32) of token ids ``[n]``: one seeded embedding row per id."""
    rows = _TABLE[ids.long().view(-1) % VOCAB]
    return rows[:, 0], rows[:, 1], rows[:, 2]


def _cp_attention(program, group, input_ids: torch.Tensor, cu_seqlens_padded: torch.Tensor) -> torch.Tensor:
    q, k, v = token_qkv(input_ids)
    cu = cu_seqlens_padded.tolist()
    if dist.get_world_size(group) == 1:
        positions = torch.arange(q.shape[0])
        return attention.masked_attention(q, k, v, positions, positions, cu)
    return program(q, k, v, cu, group)


def ring_program(group, input_ids, cu_seqlens_padded, **_):
    """Zigzag ring attention (point-to-point hops of K and V)."""
    return _cp_attention(attention.ring_attention, group, input_ids, cu_seqlens_padded)


def allgather_kv_program(group, input_ids, cu_seqlens_padded, **_):
    """All-gather K and V, attend with the rank's own queries."""
    return _cp_attention(attention.allgather_kv_attention, group, input_ids, cu_seqlens_padded)


def ulysses_program(group, input_ids, cu_seqlens_padded, **_):
    """Ulysses: all-to-all from sequence shards to head shards and back."""
    return _cp_attention(attention.ulysses_attention, group, input_ids, cu_seqlens_padded)


def _gathered_in_row_order(q, k, v, cu, group):
    cp = dist.get_world_size(group)
    k_pieces, v_pieces = [torch.empty_like(k) for _ in range(cp)], [torch.empty_like(v) for _ in range(cp)]
    dist.all_gather(k_pieces, k.contiguous(), group=group)
    dist.all_gather(v_pieces, v.contiguous(), group=group)
    k_all, v_all = torch.cat(k_pieces), torch.cat(v_pieces)  # rank 0's shard, then rank 1's, ...
    q_pos = torch.tensor(attention.zigzag_indices(cu, cp, dist.get_rank(group)))
    k_pos = torch.arange(k_all.shape[0])  # BUG: the gathered keys are in rank order, not row order
    return attention.masked_attention(q, k_all, v_all, q_pos, k_pos, cu)


def allgather_kv_in_row_order(group, input_ids, cu_seqlens_padded, **_):
    """All-gather-KV attention that forgets the zigzag order of the gathered keys (a bug)."""
    return _cp_attention(_gathered_in_row_order, group, input_ids, cu_seqlens_padded)


def full_attention(input_ids, cu_seqlens_padded, **_):
    """The reference: causal attention inside each physical segment of the whole row ``[T, heads, dim]``."""
    q, k, v = (x.transpose(0, 1) for x in token_qkv(input_ids))  # [heads, T, dim]
    lengths = (cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    position = torch.arange(segment.numel())
    allowed = (segment[:, None] == segment[None, :]) & (position[None, :] <= position[:, None])
    return scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(0, 1)
