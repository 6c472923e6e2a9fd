"""torch's own word on a mismatch: its flight-recorder matcher (``components.types.Op.match``), where it works.

cpinspect decides the divergence itself (:mod:`cpinspect.jobs.flight_recorder`); this adds what
torch's analyzer would say about the same two entries ("SIZE_OR_SYNTAX_MISMATCH, Expected input
sizes ..."), so a user who knows ``torchfrtrace`` sees its words too. Only the matcher is used: the
analyzer's loading and grouping stages fail on gloo dumps in the torch versions users have. Any
failure (an older torch without the module, a profiling name its matcher does not know) gives
``None``: the divergence stands on its own.
"""

from __future__ import annotations

from typing import Any

from cpinspect.jobs.flight_recorder_read import Entry


def torch_verdict(expected: Entry, found: Entry, members: tuple[int, ...]) -> str | None:
    """``MatchState name[, culprit text]`` of torch's ``Op(expected).match(Op(found))``, or ``None``."""
    try:
        from torch.distributed.flight_recorder.components.types import Op

        groups = {"group": set(members)}
        info = Op(event(expected), groups, "group").match(Op(event(found), groups, "group"))
        culprit = getattr(info, "culprit", None)
        return info.state.name + (f": {culprit}" if culprit else "")
    except Exception:  # noqa: BLE001 - torch's matcher is optional context, never the verdict
        return None


def event(entry: Entry) -> dict[str, Any]:
    """The entry back in the dump's own form, as torch's matcher reads it."""
    peers = f" {entry.peers}" if entry.peers else ""
    return {"profiling_name": f"{entry.backend}:{entry.op}{peers}", "state": entry.state,
            "process_group": (entry.group, entry.group_desc), "input_sizes": [list(s) for s in entry.input_sizes],
            "output_sizes": [list(s) for s in entry.output_sizes], "collective_seq_id": entry.seq,
            "p2p_seq_id": entry.p2p_seq, "input_dtypes": list(entry.input_dtypes or ()),
            "output_dtypes": list(entry.output_dtypes or ()), "time_created_ns": entry.time_created_ns,
            "frames": []}
