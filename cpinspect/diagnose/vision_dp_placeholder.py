"""VISION_DP_PLACEHOLDER as a cause: the empty ranks' 1x1 placeholder rows gathered with the real ones.

Under vision DP over CP (Nemotron Omni ``vision_dp_over_cp``, Megatron-LM#7315) a rank that holds no
vision item encodes a 1x1 placeholder image instead, so the encoder and its backward all-reduce run
on every rank; the placeholder's output rows must then be dropped before the all-gather. When they
are not, the gathered embeddings have one extra row per merged placeholder window on every such
rank, and a count check reports ``G`` placeholders against ``G + k`` rows.

The hypothesis is tested only on a batch that says its run used the fallback (the
``vision_dp_placeholder`` key): which ranks are empty comes from the simulated vision-DP split
(:class:`cpinspect.simulation.vision_dp.VisionDPExtension`), not from the error.
"""

from __future__ import annotations

from cpinspect.diagnose.errortext import ObservedError
from cpinspect.diagnose.prediction import Prediction
from cpinspect.diagnose.scene import Scene

CODE = "VISION_DP_PLACEHOLDER"
COUNT_KINDS = ("gathered_count", "feature_count", "token_features")
HINT = ("drop each placeholder image's output rows before the vision-DP all-gather (the empty rank sends 0 rows), "
        "but keep that output in the graph (e.g. add its sum times 0 to the rank's embeddings) so the rank still "
        "enters the backward all-reduce")


def placeholder_predictions(scene: Scene, observed: ObservedError) -> list[Prediction]:
    """``(G, G + k)``: the row's ``G`` placeholders against the real rows plus the empty ranks' placeholder rows."""
    from cpinspect.simulation.vision_dp import PLACEHOLDER_KEY, PLACEHOLDER_PATCHES, VisionDPExtension

    if observed.kind not in COUNT_KINDS or scene.result is None or scene.placeholders is None:
        return []
    if not any(PLACEHOLDER_KEY in extra for extra in scene.batch.extra):
        return []
    extension = VisionDPExtension(scene.batch)
    extension.run(scene.result)
    filled = [rank for rank, used in enumerate(extension.placeholder) if used]
    plan = extension.plan
    if not filled or plan is None:
        return []
    per_rank = max(PLACEHOLDER_PATCHES // scene.tokens.merge_area, 1)
    real = int(plan.rows_per_rank.sum())
    extra = per_rank * len(filled)
    ranks = ", ".join(map(str, filled))
    story = (f"vision DP over cp={scene.cp} gives {int(plan.items.count)} item(s) to ranks "
             f"{', '.join(str(r) for r in range(scene.cp) if r not in filled)}; rank(s) {ranks} hold none and encode "
             f"a 1x1 placeholder image ({PLACEHOLDER_PATCHES} patches -> {per_rank} row each, Nemotron Omni "
             f"vision_dp_over_cp, Megatron-LM#7315): {real} real rows + {extra} placeholder row(s) = {real + extra}, "
             f"against the row's {scene.placeholders} placeholders: the placeholders' rows were all-gathered instead "
             "of dropped")
    return [Prediction(CODE, scene.placeholders, real + extra, story, HINT, scope="any")]
