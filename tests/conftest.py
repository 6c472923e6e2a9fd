"""Layers: tests/unit (core maths, no group), tests/capability (one command or API each, through the
simulated group), tests/process (real processes: gloo, torchrun; CUDA). Markers select them:
``-m "not process"`` for a quick run, ``-m gpu`` on a GPU machine."""

import threading
import time
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


@pytest.fixture
def no_rank_thread_left():
    """After the test, every simulated rank thread has ended (within 30 s: a stopped rank may still unwind)."""
    yield
    deadline = time.monotonic() + 30.0
    while any(t.name.startswith("cpinspect-rank") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("cpinspect-rank") for t in threading.enumerate())
