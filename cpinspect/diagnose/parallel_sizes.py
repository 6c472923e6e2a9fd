"""CP_SPLIT_MISSING / SP_SPLIT_MISSING: "Sizes of tensors must match ... Expected size X but got size Y"
read as one tensor that skipped the CP split or the sequence-parallel split (:mod:`cpinspect.core.parallel`).

Each fitting explanation is one prediction at cost 1, so when both fit (tp = cp) both are reported
as possible, when exactly one fits it is confirmed, and when the numbers fit neither nothing is.

Without ``--tp`` the tp is read from the numbers (any integer above 1 that makes them fit); ``--tp N``
keeps only the explanations with tp = N, so numbers that need another tp confirm nothing. With
``--no-sequence-parallel`` no tensor was scattered over tp, so neither explanation applies.
"""

from __future__ import annotations

from cpinspect.core.parallel import MissingSplit, ParallelSizes, missing_splits
from cpinspect.diagnose.errortext import ObservedError
from cpinspect.diagnose.prediction import Prediction
from cpinspect.diagnose.scene import Scene

HINTS = {
    "CP": "split that tensor over CP too (the layout's own indices) before the sequence-parallel scatter, as "
          "every other activation is (Megatron-Bridge#3881: the MTP embedding applied the SP scatter only)",
    "SP": "scatter that tensor over the tensor-parallel group as well (sequence parallelism: "
          "scatter_to_sequence_parallel_region after the CP split), or gather the other one first",
}


def parallel_size_predictions(scene: Scene, observed: ObservedError) -> list[Prediction]:
    """Predictions for a size mismatch in which one side skipped the CP or the SP split."""
    expected, got = observed.get("expected"), observed.get("got")
    if expected is None or got is None or scene.sequence_parallel is False:
        return []
    fits = missing_splits(expected, got, scene.total_tokens, scene.cp, scene.tp)
    return [_prediction(fit, expected, got, scene) for fit in fits]


def _prediction(fit: MissingSplit, expected: int, got: int, scene: Scene) -> Prediction:
    total, cp, tp = scene.total_tokens, scene.cp, fit.tp
    sizes = ParallelSizes(total, cp, tp)
    named = {n: " or ".join(sizes.splits_of(n)) for n in (fit.larger, fit.smaller)}
    skipped = "the CP split" if fit.missing == "CP" else "the sequence-parallel split"
    rule = f"{total} / tp {tp}" if fit.missing == "CP" else f"{total} / cp {cp}"
    told = "given with --tp" if scene.tp is not None else "implied by the numbers"
    story = (f"with tp = {tp} ({told}) and sequence parallelism, {fit.larger} = {rule} "
             f"({named[fit.larger]}) and {fit.smaller} = {total} / (cp {cp} x tp {tp}) ({named[fit.smaller]}): "
             f"the {fit.larger}-token tensor skipped {skipped}")
    return Prediction(f"{fit.missing}_SPLIT_MISSING", expected, got, story, HINTS[fit.missing], scope="any", cost=1,
                      variant=f"tp={tp}")
