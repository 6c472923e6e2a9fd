"""Rank-uniform control flow: does the collective sequence follow rank-local data?

A case can pass while the function takes a different path on a rank with no vision token (an
early return, say) only because no case put every vision token on one side. This reruns cases
that completed with the same ``cu_seqlens``, cp and embedding count but the vision tokens moved
between ranks; a divergence then means control flow before a collective depends on rank-local
data, which would deadlock a real job on some batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from cpinspect.check.cases import Case
from cpinspect.check.run import run_case
from cpinspect.check.signatures import Signature
from cpinspect.check.verdicts import DIVERGENCE, TIMEOUT, CaseResult


@dataclass
class Uniformity:
    """Result of perturbing rank-local masks of cases that ran without divergence."""

    runs: int = 0
    finding: str | None = None
    witness: CaseResult | None = None


def mask_variants(case: Case) -> Iterator[tuple[str, Case]]:
    """Same cu_seqlens, cp and embedding count; only which rank holds the vision tokens differs."""
    owner = case.owner_of_positions()
    holders = sorted(set(owner[case.vision_mask].tolist()))
    for rank in dict.fromkeys([holders[0], holders[-1]]) if holders else []:
        moved = _move_vision(case, owner != rank)
        if moved is not None:
            yield f"rank {rank} holds no vision token", moved
    concentrated = _move_vision(case, owner == 0)
    if concentrated is not None and holders != [0]:
        yield "rank 0 holds every vision token", concentrated


def _move_vision(case: Case, allowed: torch.Tensor) -> Case | None:
    """The case with its vision tokens packed into the first ``allowed`` positions (None if too few)."""
    free = torch.nonzero(allowed).view(-1)
    if free.numel() < case.vision_tokens:
        return None
    mask = torch.zeros_like(case.vision_mask)
    mask[free[: case.vision_tokens]] = True
    return case.with_mask(mask)


def check_uniformity(fn: Callable[..., Any], signature: Signature, results: Sequence[CaseResult], *,
                     timeout: float, strict_apply: bool, deadline: float, max_bases: int = 8) -> Uniformity:
    """Rerun cases that did not diverge with rank-local masks moved around; divergence means the
    collective sequence follows rank-local data (an early return on an empty mask, say)."""
    bases = [r for r in results if r.completed and r.case.cp > 1 and r.case.vision_tokens > 0]
    per_cp: dict[int, list[CaseResult]] = {}
    for result in bases:
        if len(per_cp.setdefault(result.case.cp, [])) < 2:
            per_cp[result.case.cp].append(result)
    chosen = [r for group in per_cp.values() for r in group][:max_bases]
    uniformity = Uniformity()
    for base in chosen:
        for label, variant in mask_variants(base.case):
            if time.monotonic() > deadline:
                return uniformity
            run = run_case(fn, replace(variant, name=f"{base.case.name}, {label}"), signature, timeout=timeout,
                           strict_apply=strict_apply)
            uniformity.runs += 1
            if run.verdict in (DIVERGENCE, TIMEOUT) or run.partial:
                uniformity.finding = (
                    f"{base.case.name} ({base.case.describe()}) ran without divergence, but with its vision tokens "
                    f"moved so that {label} (same cu_seqlens, cp and {base.case.vision_embed_count} embeddings) "
                    f"the ranks disagree ({run.verdict}): the collective sequence follows rank-local data. Control "
                    "flow before a collective must depend only on what every rank shares (cu_seqlens, cp, "
                    "vision_embed_count) or has exchanged"
                )
                uniformity.witness = run
                return uniformity
    return uniformity
