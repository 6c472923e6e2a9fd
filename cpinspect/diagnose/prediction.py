"""What a hypothesis predicts an error reports: the shared type of :mod:`cpinspect.diagnose.hypotheses`."""

from __future__ import annotations

from dataclasses import dataclass

NOT_SELECTED_HINT = (
    "select this rank's rows before the scatter: the count all-gather selection "
    "(cpinspect.local_vision_rows, Megatron-Bridge's pre-sharded path from PR #4917 with miles#1308) gives "
    "each rank exactly its rows; or hand the model the full row and shard after the scatter"
)

OTHER_CPS = range(1, 17)


@dataclass(frozen=True)
class Prediction:
    """What one candidate cause predicts the error reports: ``tokens`` positions, ``rows`` rows."""

    code: str
    tokens: int | None
    rows: int | None
    story: str
    hint: str
    rank: int | None = None
    scope: str = "rank"
    segment: int | None = None
    cost: int = 0  # assumptions changed beyond the data as given: the simplest matching cause wins
    variant: str = ""  # which alternative (layout, cp) the prediction assumes
