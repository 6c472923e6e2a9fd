"""cpinspect: inspect and debug context-parallel sharding of packed multimodal batches.

The public names are loaded lazily so that ``import cpinspect`` (and the CLI's ``--help``) does
not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_batch": "cpinspect.batch",
    "PackedBatch": "cpinspect.batch",
    "simulate": "cpinspect.simulation",
    "Result": "cpinspect.simulation",
    "RankResult": "cpinspect.simulation",
    "run_spmd": "cpinspect.spmd",
    "execute_spmd": "cpinspect.spmd",
    "SimulatedProcessGroup": "cpinspect.spmd",
    "SpmdError": "cpinspect.spmd",
    "local_vision_rows": "cpinspect.selection",
    "local_vision_row_map": "cpinspect.selection",
    "VisionRowMap": "cpinspect.selection",
    "VisionCountMismatch": "cpinspect.selection",
    "make_layout": "cpinspect.layout",
    "Layout": "cpinspect.layout",
    "Finding": "cpinspect.findings",
    "InputError": "cpinspect.errors",
    "CpInspectError": "cpinspect.errors",
    "verify": "cpinspect.verification",
    "VerificationError": "cpinspect.verification",
    "capture": "cpinspect.capture",  # the module itself: cpinspect.capture.record(...)
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import warnings

        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        module = importlib.import_module(_EXPORTS[name])
        return module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    raise AttributeError(f"module 'cpinspect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
