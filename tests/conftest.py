"""Layers: tests/unit (core maths, no group), tests/capability (one command or API each, through the
simulated group), tests/process (real processes: gloo, torchrun; CUDA). Markers select them:
``-m "not process"`` for a quick run, ``-m gpu`` on a GPU machine."""

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

_LAYER_MARKS = {"unit": "unit", "capability": "capability", "process": "process"}
_GPU_FILES = {"test_gpu_sync.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        layer = _LAYER_MARKS.get(path.parent.name)
        if layer:
            item.add_marker(getattr(pytest.mark, layer))
        if path.name in _GPU_FILES:
            item.add_marker(pytest.mark.gpu)
