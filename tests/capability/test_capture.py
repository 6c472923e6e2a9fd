"""capture.record: one safetensors file per rank and step, off by default, atomic, never raising."""

import json
import threading
import time
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cpinspect import capture
from cpinspect.groups.gloo import execute_gloo
from cpinspect.groups.simulated import execute_spmd

CU = torch.tensor([0, 8, 16], dtype=torch.int32)


def rank_inputs(rank: int) -> dict:
    """Megatron-Bridge's two-segment cp=2 vector (reference §3.1): local masks and the rows they select."""
    masks = [[1, 0, 1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0, 1, 1]]
    rows = [[0, 3, 4, 8], [1, 2, 5, 6, 7]]
    return {
        "input_ids": torch.arange(8).view(1, 8) + 100 * rank,
        "cu_seqlens": CU,
        "vision_mask": torch.tensor(masks[rank], dtype=torch.bool),
        "selected_rows": torch.tensor(rows[rank]),
        "position_ids": torch.arange(24).view(3, 1, 8),
        "vision_embed_count": 9,
    }


class Untouchable:
    """Raises on any use: proves a disabled capture never looks at its arguments."""

    def __getattr__(self, name):
        raise AssertionError(f"a disabled capture touched .{name}")


def test_record_writes_the_rank_tensors_and_metadata(tmp_path):
    inputs = rank_inputs(0)
    path = capture.record(tmp_path, step=7, enabled=True, **inputs)
    assert path == tmp_path / "step000007-rank00000.safetensors"
    stored = load_file(path)
    assert stored["input_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert stored["cu_seqlens"].tolist() == [0, 8, 16] and stored["cu_seqlens"].dtype == torch.int32
    assert stored["vision_mask"].tolist() == [True, False, True, True, False, False, True, False]
    assert stored["selected_rows"].tolist() == [0, 3, 4, 8]
    assert stored["position_ids"].shape == (3, 1, 8)
    assert stored["vision_embed_count"].tolist() == [9]
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "cpinspect-capture/1"
    assert (meta["step"], meta["cp_rank"], meta["cp_size"], meta["global_rank"]) == ("7", "0", "1", "0")
    assert json.loads(meta["group_ranks"]) == [0]
    described = json.loads(meta["tensors"])
    assert described["vision_mask"] == {"dtype": "bool", "shape": [8], "device": "cpu"}
    assert described["cu_seqlens"]["dtype"] == "int32"
    versions = json.loads(meta["versions"])
    assert versions["torch"] == torch.__version__ and versions["cpinspect"] and versions["python"]


def test_capture_is_off_by_default_and_never_touches_its_arguments(tmp_path, monkeypatch):
    monkeypatch.delenv(capture.ENV_VAR, raising=False)
    target = tmp_path / "never"
    anything = Untouchable()
    result = capture.record(target, step=Untouchable(), input_ids=anything, cu_seqlens=anything,
                            vision_mask=anything, vision_embed_count=anything, selected_rows=anything)
    assert result is None and not target.exists()


def test_disabled_call_costs_microseconds(monkeypatch):
    monkeypatch.delenv(capture.ENV_VAR, raising=False)
    start = time.perf_counter()
    for _ in range(10_000):
        capture.record("unused", step=0, input_ids=None, cu_seqlens=None, vision_mask=None, vision_embed_count=0,
                       selected_rows=None)
    per_call = (time.perf_counter() - start) / 10_000
    assert per_call < 50e-6  # typically ~1 µs: one environment lookup


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("ON", True), ("0", False), ("off", False),
                                       ("", False)])
def test_environment_variable_switches_capture(tmp_path, monkeypatch, value, on):
    monkeypatch.setenv(capture.ENV_VAR, value)
    path = capture.record(tmp_path, step=1, **rank_inputs(0))
    assert (path is not None) == on
    assert capture.record(tmp_path / "x", step=1, enabled=False, **rank_inputs(0)) is None  # the argument wins


def test_io_failure_warns_and_returns_none(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(capture.CaptureWarning, match="capture of step 3 into .*a-file.* failed"):
        assert capture.record(blocker / "sub", step=3, enabled=True, **rank_inputs(0)) is None


def test_bad_argument_warns_instead_of_raising(tmp_path):
    inputs = {**rank_inputs(0), "vision_embed_count": "nine"}
    with pytest.warns(capture.CaptureWarning, match="ValueError"):
        assert capture.record(tmp_path, step=0, enabled=True, **inputs) is None
    assert capture.scan(tmp_path) == []


def test_the_callers_tensors_are_neither_changed_nor_shared(tmp_path):
    inputs = rank_inputs(1)
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    path = capture.record(tmp_path, step=0, enabled=True, **inputs)
    for name, tensor in before.items():
        assert torch.equal(inputs[name], tensor)
    inputs["selected_rows"].add_(100)  # the file holds a copy
    assert load_file(path)["selected_rows"].tolist() == [1, 2, 5, 6, 7]


def record_on_rank(group, directory, step):
    return str(capture.record(directory, step=step, cp_group=group, enabled=True, **rank_inputs(group.rank() % 2)))


def test_ranks_writing_at_once_never_expose_a_partial_file(tmp_path):
    """Four simulated ranks rewrite their files 25 times while a reader keeps reading every file."""
    stop, errors, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            for path in capture.scan(tmp_path):
                try:
                    assert capture.read(path).cp_size == 4
                    reads[0] += 1
                except Exception as exc:  # noqa: BLE001 - collected for the assertion below
                    errors.append(exc)

    def writer(group, directory):
        for _ in range(25):
            record_on_rank(group, directory, 0)
        return group.rank()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        states, failure = execute_spmd(4, writer, tmp_path, timeout=60.0)
    finally:
        stop.set()
        thread.join()
    assert failure is None and errors == [] and reads[0] > 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"step000000-rank0000{r}.safetensors" for r in range(4)]  # no temporary file left
    assert [capture.read(tmp_path / n).cp_rank for n in names] == [0, 1, 2, 3]


def test_real_gloo_group_metadata(tmp_path):
    states, failure = execute_gloo(2, record_on_rank, str(tmp_path), 5, timeout=30.0)
    assert failure is None
    for rank in range(2):
        captured = capture.read(tmp_path / f"step000005-rank0000{rank}.safetensors")
        assert (captured.step, captured.cp_rank, captured.cp_size, captured.global_rank) == (5, rank, 2, rank)
        assert captured.group_ranks == (0, 1)
        assert captured.metadata["backend"] == "gloo"
        assert captured.tensors["selected_rows"].tolist() == rank_inputs(rank)["selected_rows"].tolist()


def test_read_refuses_a_file_that_is_not_a_capture(tmp_path):
    from safetensors.torch import save_file

    from cpinspect.core.errors import InputError

    path = tmp_path / "step000000-rank00000.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(InputError, match="not a readable cpinspect capture"):
        capture.read(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_copied_to_the_host(tmp_path):
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in rank_inputs(0).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", capture.CaptureWarning)
        path = capture.record(tmp_path, step=0, enabled=True, **inputs)
    captured = capture.read(path)
    assert captured.tensors["selected_rows"].device.type == "cpu"
    assert captured.tensors["selected_rows"].tolist() == [0, 3, 4, 8]
    assert json.loads(captured.metadata["tensors"])["vision_mask"]["device"].startswith("cuda")
    assert json.loads(captured.metadata["versions"])["gpu"]
