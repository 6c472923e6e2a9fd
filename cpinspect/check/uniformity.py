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
from cpinspect.check.verdicts import DIVERGENCE, EXCEPTION, RANK_DEPENDENT, TIMEOUT, CaseResult


@dataclass
class Uniformity:
    """Result of perturbing rank-local masks of cases that ran without divergence.

    ``verdict`` names the finding: ``rank-dependent-collectives`` (the ranks' collective sequences
    part, or one hangs), or ``exception`` when the moved vision tokens only make some ranks raise
    after the same collectives as the others (an error on rank-local data, not control flow).
    ``skipped`` says why fewer runs were made than planned (none, or cut short), when that happened.
    """

    runs: int = 0
    finding: str | None = None
    witness: CaseResult | None = None
    verdict: str = RANK_DEPENDENT
    skipped: str = ""

    @property
    def shrink_label(self) -> str:
        """The shrunk failure's label and file-name part (never the same as a case verdict's)."""
        return RANK_DEPENDENT if self.verdict == RANK_DEPENDENT else f"{self.verdict}-moved-vision"


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
    uniformity = Uniformity(skipped=_no_base_reason(results) if not chosen else "")
    for base in chosen:
        for label, variant in mask_variants(base.case):
            if time.monotonic() > deadline:
                uniformity.skipped = f"--max-time was reached after {uniformity.runs} perturbed run(s)"
                return uniformity
            run = run_case(fn, replace(variant, name=f"{base.case.name}, {label}"), signature, timeout=timeout,
                           strict_apply=strict_apply)
            uniformity.runs += 1
            if run.verdict in (DIVERGENCE, TIMEOUT) or run.partial:
                moved = (f"{base.case.name} ({base.case.describe()}) ran without divergence, but with its vision "
                         f"tokens moved so that {label} (same cu_seqlens, cp and {base.case.vision_embed_count} "
                         "embeddings)")
                if run.partial and same_collectives_then_raised(run):
                    uniformity.verdict = EXCEPTION
                    raised = [r for r in run.ranks if r.status == "raised"]
                    who = ", ".join(str(r.rank) for r in raised)
                    uniformity.finding = (
                        f"{moved} rank(s) {who} raised after the same {len(raised[0].calls)} collective(s) as every "
                        f"other rank ({run.summary}): an exception on rank-local data, not control flow. Make the "
                        "code after the collectives handle a rank without vision tokens (an empty mask gives zero "
                        "rows, not an error)")
                else:
                    uniformity.finding = (
                        f"{moved} the ranks disagree ({run.verdict}): the collective sequence follows rank-local "
                        "data. Control flow before a collective must depend only on what every rank shares "
                        "(cu_seqlens, cp, vision_embed_count) or has exchanged")
                uniformity.witness = run
                return uniformity
    if chosen and not uniformity.runs:
        uniformity.skipped = ("no clean case's vision tokens could be moved off a rank or onto rank 0 (too many "
                              "vision tokens for the free positions)")
    return uniformity


def _no_base_reason(results: Sequence[CaseResult]) -> str:
    """Why no case could seed the probe: the first condition every case misses."""
    if not results:
        return "no case ran"
    if not any(r.case.cp > 1 for r in results):
        return "every case ran at cp 1, where one rank holds everything"
    if not any(r.case.cp > 1 and r.case.vision_tokens > 0 for r in results):
        return "no case with cp > 1 has vision tokens"
    return "no case with cp > 1 and vision tokens completed on every rank"


def same_collectives_then_raised(result: CaseResult) -> bool:
    """Only some ranks raised, each after exactly the collectives every rank completed (the others may wait
    in one more): the exception, not the collective sequence, is what differs between the ranks."""
    raised = [r for r in result.ranks if r.status == "raised"]
    others = [r for r in result.ranks if r.status != "raised"]
    if not raised or not others:
        return False
    done = [c.fingerprint() for c in raised[0].calls]
    if any([c.fingerprint() for c in r.calls] != done for r in raised):
        return False
    for rank in others:
        calls = [c.fingerprint() for c in rank.calls]
        if calls[:len(done)] != done or len(calls) > len(done) + 1 or (len(calls) > len(done)
                                                                           and rank.status != "waiting"):
            return False
    return True
