"""Vision spans of a packed row against the grids that describe them.

Every image (and every Qwen3-VL video frame, or every whole Qwen2/2.5-VL video) is one maximal run
of placeholder ids of ``t*h*w / merge**2`` tokens (``h*w / merge**2`` per Qwen3-VL frame). The
encoder produces rows for the *grids*, the scatter fills the *placeholders*: wherever the two
lists disagree, a count error follows. :func:`align_spans` walks both lists in order and says
where they part: a run cut at the end of its sample (truncation by packing or ``cutoff_len``),
items whose placeholders are gone entirely, or a run whose length no grid explains.

Runs are found with vectorised torch ops; the walk is over items (images/frames), never tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpinspect.core.runs import mask_runs
from cpinspect.core.vision_items import VisionItem


@dataclass(frozen=True)
class Runs:
    """Maximal placeholder runs of one kind, in row order, split at segment boundaries."""

    start: torch.Tensor
    length: torch.Tensor
    segment: torch.Tensor
    cut: torch.Tensor  # bool: the run ends exactly where its sample's content ends

    def __len__(self) -> int:
        return int(self.start.numel())


@dataclass(frozen=True)
class SpanIssue:
    """Where placeholders and grids part. ``problem`` is truncated | dropped | mismatch | extra."""

    problem: str
    item: VisionItem | None
    run_start: int | None = None
    run_length: int | None = None
    segment: int | None = None


def content_ends(ids: torch.Tensor, cu: torch.Tensor, logical_cu: torch.Tensor | None, pad_id: int) -> torch.Tensor:
    """``[S]`` end of each segment's real content: the logical end, else after its last non-pad token."""
    if logical_cu is not None:
        return logical_cu[1:].clone()
    positions = torch.arange(ids.numel())
    segment = torch.searchsorted(cu[1:], positions, right=True)
    ends = cu[:-1].clone()
    keep = ids != pad_id
    return ends.scatter_reduce(0, segment[keep], positions[keep] + 1, reduce="amax")


def find_runs(mask: torch.Tensor, cu: torch.Tensor, ends: torch.Tensor) -> Runs:
    """Maximal runs of ``mask`` that never cross a segment boundary."""
    starts, lengths = mask_runs(mask, cu)
    segment = torch.searchsorted(cu[1:], starts, right=True)
    return Runs(starts, lengths, segment, starts + lengths == ends[segment])


def align_spans(items: list[VisionItem], runs: Runs) -> list[SpanIssue]:
    """Walk grids and runs in order; report every place they disagree (empty: they agree).

    A short run that ends where its sample's content ends is *truncated*; the items after it
    whose placeholders never appear are *dropped* (skipped until the next run fits again).
    """
    starts, lengths, segments, cuts = (runs.start.tolist(), runs.length.tolist(), runs.segment.tolist(),
                                       runs.cut.tolist())
    issues: list[SpanIssue] = []
    k = 0
    for i, (start, length, segment, cut) in enumerate(zip(starts, lengths, segments, cuts)):
        if k >= len(items):
            issues.append(SpanIssue("extra", None, start, length, segment))
            continue
        item = items[k]
        k += 1
        if length == item.tokens:
            continue
        truncated = length < item.tokens and cut
        issues.append(SpanIssue("truncated" if truncated else "mismatch", item, start, length, segment))
        if truncated:
            next_length = lengths[i + 1] if i + 1 < len(lengths) else None
            while k < len(items) and items[k].tokens != next_length:
                issues.append(SpanIssue("dropped", items[k], None, None, segment))
                k += 1
    after_cut = bool(issues) and issues[-1].problem in ("truncated", "dropped")
    issues.extend(SpanIssue("dropped" if after_cut else "missing", item) for item in items[k:])
    return issues


def same_id_runs(ids: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and lengths of maximal runs of one repeated id (split at segment boundaries)."""
    n = ids.numel()
    if n == 0:
        return ids.new_zeros(0), ids.new_zeros(0)
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = ids[1:] != ids[:-1]
    new_run[cu[:-1][cu[:-1] < n]] = True
    starts = torch.nonzero(new_run).view(-1)
    lengths = torch.diff(torch.cat([starts, torch.tensor([n])]))
    return ids[starts], lengths


def placeholder_candidates(ids: torch.Tensor, cu: torch.Tensor, items: list[VisionItem],
                           exclude: set[int]) -> list[int]:
    """Ids other than ``exclude`` whose runs have exactly the lengths ``items`` promise, in order."""
    if not items:
        return []
    wanted = [item.tokens for item in items]
    counts = torch.bincount(ids)
    same_total = torch.nonzero(counts == sum(wanted)).view(-1).tolist()
    run_ids, run_lengths = same_id_runs(ids, cu)
    found = []
    for token_id in same_total:
        if token_id in exclude:
            continue
        if run_lengths[run_ids == token_id].tolist() == wanted:
            found.append(int(token_id))
    return found
