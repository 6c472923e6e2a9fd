"""cpinspect: inspect and debug context-parallel sharding of packed multimodal batches.

The public names are loaded lazily so that ``import cpinspect`` (and the CLI's ``--help``) does
not import torch; type checkers see the real imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from cpinspect.core.batch import PackedBatch
    from cpinspect.core.errors import CpInspectError, InputError
    from cpinspect.core.findings import Finding
    from cpinspect.core.layout import Layout, make_layout
    from cpinspect.core.loading import load_batch
    from cpinspect.core.selection import VisionCountMismatch, VisionRowMap, local_vision_row_map, local_vision_rows
    from cpinspect.groups.simulated import SimulatedProcessGroup, SpmdError, execute_spmd, run_spmd
    from cpinspect.jobs import capture
    from cpinspect.jobs.verify import VerificationError, verify
    from cpinspect.simulation.run import RankResult, Result, simulate

_EXPORTS = {
    "load_batch": "cpinspect.core.loading",
    "PackedBatch": "cpinspect.core.batch",
    "simulate": "cpinspect.simulation.run",
    "Result": "cpinspect.simulation.run",
    "RankResult": "cpinspect.simulation.run",
    "run_spmd": "cpinspect.groups.simulated",
    "execute_spmd": "cpinspect.groups.simulated",
    "SimulatedProcessGroup": "cpinspect.groups.simulated",
    "SpmdError": "cpinspect.groups.simulated",
    "local_vision_rows": "cpinspect.core.selection",
    "local_vision_row_map": "cpinspect.core.selection",
    "VisionRowMap": "cpinspect.core.selection",
    "VisionCountMismatch": "cpinspect.core.selection",
    "make_layout": "cpinspect.core.layout",
    "Layout": "cpinspect.core.layout",
    "Finding": "cpinspect.core.findings",
    "InputError": "cpinspect.core.errors",
    "CpInspectError": "cpinspect.core.errors",
    "verify": "cpinspect.jobs.verify",
    "VerificationError": "cpinspect.jobs.verify",
}
_MODULES = {"capture": "cpinspect.jobs.capture"}  # cpinspect.capture.record(...)

__all__ = [
    "load_batch",
    "PackedBatch",
    "simulate",
    "Result",
    "RankResult",
    "run_spmd",
    "execute_spmd",
    "SimulatedProcessGroup",
    "SpmdError",
    "local_vision_rows",
    "local_vision_row_map",
    "VisionRowMap",
    "VisionCountMismatch",
    "make_layout",
    "Layout",
    "Finding",
    "InputError",
    "CpInspectError",
    "verify",
    "VerificationError",
    "capture",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cpinspect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
