"""Which known CP collective a recorded stack is, and the cpinspect finding that names its failure.

Matched by function names read from the stacks the flight recorder keeps (innermost frame first):

* the **count all-gather** of the pre-sharded vision selection: Megatron-Bridge's
  ``_get_cp_local_vision_embed_indices`` all-gathers the ``[S, 2]`` per-chunk vision counts, and
  cpinspect's ``local_vision_rows`` / ``local_vision_row_map`` do it in ``LocalCounts.gather_flat``
  (``cpinspect/core/selection.py``);
* the **vision-DP all-gather** of the encoded rows: cpinspect's ``all_gather_vision_embeddings``
  (``cpinspect/simulation/vision_dp_split.py``), or an all-gather in the ``forward`` of a custom
  autograd Function (the frame below it is ``apply`` in ``torch/autograd/function.py``), which is
  how Megatron-Bridge's ``AllGatherVisionEmbeddings`` is written;
* the **backward all-reduce** of the gathered rows' gradient: cpinspect's ``reduce_vision_grad``,
  or an all-reduce in the ``backward`` of a custom autograd Function (AllGatherVisionEmbeddings'
  backward after Megatron-Bridge#4784).

The autograd rules are stated as "the shape of" Bridge's code: a frame named ``forward`` says which
kind of function ran, not whose.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpinspect.jobs.flight_recorder_read import Frame

COUNT, VISION_DP, BACKWARD = "the count all-gather", "the vision-DP all-gather", "the backward all-reduce"

SKIPPED = {
    COUNT: ("a rank that skips the count all-gather is what `cpinspect check module:fn --cp N` reports as a "
            "divergence (a rank returned while the others wait); every CP rank, even one without vision tokens, "
            "must call it"),
    VISION_DP: ("VISION_DP_EMPTY_RANK (cpinspect simulate BATCH --cp N --vision-dp): a rank with no vision item "
                "must still enter this all-gather, with 0 rows"),
    BACKWARD: ("VISION_DP_EMPTY_RANK_SKIPS_COLLECTIVE (cpinspect simulate BATCH --cp N --vision-dp): a rank whose "
               "zero-row placeholder does not require grad skips this all-reduce (Megatron-Bridge#4784; fix: "
               "ensure_requires_grad_for_cp_collective)"),
}
MISMATCHED = ("COLLECTIVE_DIVERGENCE: the simulated group compares every collective's op, shapes and dtypes across "
              "ranks, so `cpinspect check module:fn --cp N` shows this mismatch on one machine")


@dataclass(frozen=True)
class CpSite:
    """A recognised CP site: which one, the frame that says so, and the matching cpinspect finding."""

    site: str
    evidence: str
    finding: str

    def to_dict(self) -> dict[str, str]:
        return {"site": self.site, "evidence": self.evidence, "finding": self.finding}


def op_family(op: str) -> str:
    """``allgather`` / ``allreduce`` / the op itself: torch names one op several ways across backends."""
    flat = op.lower().replace("_", "")
    for family in ("allgather", "allreduce"):
        if family in flat:
            return family
    return flat


def recognise(op: str, frames: tuple[Frame, ...], *, skipped: bool = True) -> CpSite | None:
    """The CP site the innermost recognisable frame of ``frames`` names, for an op of its kind.

    ``skipped``: the finding for a rank that did not enter it; else the one for ranks that entered
    it with different ops, shapes or dtypes.
    """
    family = op_family(op)
    for index, frame in enumerate(frames):
        caller = frames[index + 1] if index + 1 < len(frames) else None
        found = _match(family, frame, caller)
        if found is not None:
            site, evidence = found
            return CpSite(site, f"{evidence} ({frame.where()})", SKIPPED[site] if skipped else MISMATCHED)
    return None


def _match(family: str, frame: Frame, caller: Frame | None) -> tuple[str, str] | None:
    path = frame.filename.replace("\\", "/")
    in_autograd = caller is not None and caller.name == "apply" and \
        caller.filename.replace("\\", "/").endswith("torch/autograd/function.py")
    if family == "allgather":
        if frame.name == "_get_cp_local_vision_embed_indices":
            return COUNT, "Megatron-Bridge's pre-sharded selection _get_cp_local_vision_embed_indices"
        if path.endswith("cpinspect/core/selection.py") and frame.name in ("gather", "gather_flat", "local_vision_rows",
                                                                            "local_vision_row_map"):
            return COUNT, f"cpinspect's selection, {frame.name}"
        if frame.name == "all_gather_vision_embeddings" and path.endswith("cpinspect/simulation/vision_dp_split.py"):
            return VISION_DP, "cpinspect's all_gather_vision_embeddings"
        if frame.name == "forward" and in_autograd:
            return VISION_DP, "the forward of a custom autograd Function (the shape of AllGatherVisionEmbeddings)"
    if family == "allreduce":
        if frame.name == "reduce_vision_grad" and path.endswith("cpinspect/simulation/vision_dp_split.py"):
            return BACKWARD, "cpinspect's reduce_vision_grad"
        if frame.name == "backward" and in_autograd:
            return BACKWARD, "the backward of a custom autograd Function (the shape of AllGatherVisionEmbeddings)"
    return None
