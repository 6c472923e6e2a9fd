"""Context-parallel attention over one packed THD row, written as a user would, in plain torch.

The row holds several documents (``cu_seqlens``); attention is causal inside each document. Each
of the ``cp`` ranks holds the zigzag shard of every document (chunks ``r`` and ``2*cp-1-r`` of
``2*cp``), the layout Megatron and TransformerEngine use for THD context parallelism. Two programs:

* :func:`allgather_kv_attention`: each rank all-gathers K and V (``all_gather_into_tensor``;
  backward: ``reduce_scatter_tensor``) and attends with its own queries;
* :func:`ulysses_attention`: all-to-all from sequence shards to head shards
  (``all_to_all_single``), full attention on ``heads/cp`` heads, all-to-all back;
* :func:`ring_attention`: zigzag ring attention, K and V travel around the ring by point-to-point
  (``batch_isend_irecv`` of ``isend``/``irecv``), ``cp - 1`` hops, each rank attending with its own
  queries to the block in hand; the blocks' partial scores are merged by log-sum-exp.

Vision DP: :class:`AllGatherVisionEmbeddings` as Megatron-Bridge writes it (one ``all_gather`` of
each rank's own row count: uneven, as NCCL allows), and :class:`PaddedAllGatherVisionEmbeddings`,
the same table built from equal-size pieces (padded to the largest rank's rows, then trimmed), the
form a backend without uneven all-gathers (gloo) runs.

All are differentiable (their collectives are wrapped in ``torch.autograd.Function``; the ring's
hop sends the gradient the other way round), so a test can compare outputs and gradients with
full attention on the unsharded row. The file is self-contained: load it by path or import it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def zigzag_indices(cu_seqlens: list[int], cp: int, rank: int) -> list[int]:
    """The row positions rank ``rank`` holds: per document, chunk ``rank`` then chunk ``2*cp-1-rank``."""
    held: list[int] = []
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        chunk = (end - start) // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            held.extend(range(start + c * chunk, start + (c + 1) * chunk))
    return held


def document_of(cu_seqlens: list[int], positions: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(positions, torch.tensor(cu_seqlens[1:]), right=True)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     cu_seqlens: list[int]) -> torch.Tensor:
    """Softmax attention of ``q`` [n, h, d] over ``k``/``v`` [m, h, d]: same document, key not after query."""
    allowed = (document_of(cu_seqlens, q_pos)[:, None] == document_of(cu_seqlens, k_pos)[None, :]) \
        & (k_pos[None, :] <= q_pos[:, None])
    scores = torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = local.new_empty((local.shape[0] * dist.get_world_size(group), *local.shape[1:]))
        dist.all_gather_into_tensor(out, local.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        local = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        dist.reduce_scatter_tensor(local, grad.contiguous(), group=ctx.group)
        return local, None


class _AllToAll(torch.autograd.Function):
    """[cp * n, ...] split along dim 0 into cp pieces, piece j to rank j; backward is the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = torch.empty_like(x, memory_format=torch.contiguous_format)  # x may be a transposed einsum result
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def allgather_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                           group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's attention output for its zigzag shard ``q``/``k``/``v`` [n_local, heads, dim]."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    k_all, v_all = _AllGather.apply(k, group), _AllGather.apply(v, group)
    k_pos = torch.tensor([p for r in range(cp) for p in zigzag_indices(cu_seqlens, cp, r)])
    q_pos = torch.tensor(zigzag_indices(cu_seqlens, cp, rank))
    return masked_attention(q, k_all, v_all, q_pos, k_pos, cu_seqlens)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                      group: dist.ProcessGroup) -> torch.Tensor:
    """Ulysses: sequence shards -> head shards (all-to-all), attention on heads/cp heads, and back."""
    cp = dist.get_world_size(group)
    n, heads, dim = q.shape
    if heads % cp:
        raise ValueError(f"Ulysses needs the {heads} heads to divide by cp={cp}")

    def to_heads(x: torch.Tensor) -> torch.Tensor:  # [n, h, d] -> [cp * n, h / cp, d], tokens in rank order
        pieces = x.reshape(n, cp, heads // cp, dim).transpose(0, 1).reshape(cp * n, heads // cp, dim)
        return _AllToAll.apply(pieces, group)

    def to_sequence(x: torch.Tensor) -> torch.Tensor:  # the inverse
        back = _AllToAll.apply(x, group)
        return back.reshape(cp, n, heads // cp, dim).transpose(0, 1).reshape(n, heads, dim)

    positions = torch.tensor([p for r in range(cp) for p in zigzag_indices(cu_seqlens, cp, r)])
    out = masked_attention(to_heads(q), to_heads(k), to_heads(v), positions, positions, cu_seqlens)
    return to_sequence(out)


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


class AllGatherVisionEmbeddings(torch.autograd.Function):
    """Megatron-Bridge-style vision DP: each rank encodes its own images (a different number of rows
    per rank), all ranks all-gather every rank's rows into the full embedding table, and backward
    all-reduces the table's gradient (each rank used other rows) and keeps the rank's own slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        count = torch.tensor([local.shape[0]])
        counts = [torch.empty_like(count) for _ in range(cp)]
        dist.all_gather(counts, count, group=group)
        sizes = [int(c) for c in counts]
        pieces = [local.new_empty((n, *local.shape[1:])) for n in sizes]
        dist.all_gather(pieces, local.contiguous(), group=group)
        ctx.group, ctx.start, ctx.rows = group, sum(sizes[:rank]), sizes[rank]
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.start:ctx.start + ctx.rows], None


class PaddedAllGatherVisionEmbeddings(torch.autograd.Function):
    """:class:`AllGatherVisionEmbeddings` from equal-size pieces: every rank pads its rows to the largest
    rank's count, ``all_gather_into_tensor`` moves them, and each piece's padding is dropped."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        counts = torch.empty(cp, dtype=torch.long)
        dist.all_gather_into_tensor(counts, torch.tensor([local.shape[0]]), group=group)
        sizes, longest = counts.tolist(), int(counts.max())
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[:local.shape[0]] = local
        table = local.new_empty((cp * longest, *local.shape[1:]))
        dist.all_gather_into_tensor(table, padded, group=group)
        ctx.group, ctx.start, ctx.rows = group, sum(sizes[:rank]), sizes[rank]
        return torch.cat([table[r * longest:r * longest + n] for r, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.start:ctx.start + ctx.rows], None
