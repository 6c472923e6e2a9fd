"""Zigzag ring attention over one packed THD row, in plain torch: K and V travel around the ring by
point-to-point (``batch_isend_irecv`` of ``isend``/``irecv``), ``cp - 1`` hops, each rank attending
with its own queries to the block in hand; the blocks' partial scores are merged by log-sum-exp.

The hop is a ``torch.autograd.Function`` whose backward sends the gradient the other way round,
so the program is differentiable end to end. Layout and masking are those of
:mod:`examples.cp_programs.attention`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from examples.cp_programs.attention import document_of, zigzag_indices


def _exchange(x: torch.Tensor, to: int, source: int, group: dist.ProcessGroup) -> torch.Tensor:
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), dist.get_global_rank(group, to), group=group),
           dist.P2POp(dist.irecv, out, dist.get_global_rank(group, source), group=group)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return out


class _Hop(torch.autograd.Function):
    """Pass ``x`` to the next rank and take the previous rank's; backward: the reverse hop."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        rank, cp = dist.get_rank(group), dist.get_world_size(group)
        return _exchange(x, (rank + 1) % cp, (rank - 1) % cp, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rank, cp = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return _exchange(grad, (rank - 1) % cp, (rank + 1) % cp, ctx.group), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                   group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's attention output for its zigzag shard ``q``/``k``/``v`` [n_local, heads, dim]."""
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    q_pos = torch.tensor(zigzag_indices(cu_seqlens, cp, rank))
    q_doc = document_of(cu_seqlens, q_pos)
    kv = torch.stack([k, v])
    scores, values = [], []
    for step in range(cp):
        if step:
            kv = _Hop.apply(kv, group)
        k_pos = torch.tensor(zigzag_indices(cu_seqlens, cp, (rank - step) % cp))  # whose block we hold
        allowed = (q_doc[:, None] == document_of(cu_seqlens, k_pos)[None, :]) & (k_pos[None, :] <= q_pos[:, None])
        block = torch.einsum("nhd,mhd->hnm", q, kv[0]) / q.shape[-1] ** 0.5
        scores.append(block.masked_fill(~allowed[None], float("-inf")))
        values.append(kv[1])
    lse = torch.logsumexp(torch.cat(scores, dim=-1), dim=-1, keepdim=True)  # [h, n, 1]
    return sum(torch.einsum("hnm,mhd->nhd", (s - lse).exp(), val) for s, val in zip(scores, values))
