"""Reliability items 19.3, 19.5, 19.9 (loading): hostile sizes, silent wrong reads, plain messages."""

import json
import os
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from cpinspect.core import synth
from cpinspect.core.errors import InputError
from cpinspect.core.loading import load_batch


def _deflated_bomb(path, declared):
    """A torch-style zip whose storage entry is DEFLATE-compressed zeros (torch.save stores entries plain)."""
    torch.save({"input_ids": torch.zeros(4, dtype=torch.long), "cu_seqlens": torch.tensor([0, 4])}, path)
    with zipfile.ZipFile(path) as src:
        entries = [(i.filename, src.read(i.filename)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in entries:
            if name.endswith("data/0"):
                data = bytes(declared)
            dst.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name.endswith("data/0") else 0)


def test_compressed_entry_declaring_100x_its_bytes_is_refused_before_reading(tmp_path):
    path = tmp_path / "bomb.pt"
    _deflated_bomb(path, 20 << 20)
    stored = next(i.compress_size for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("data/0"))
    assert stored * 100 < 20 << 20
    before = path.read_bytes()
    with pytest.raises(InputError, match=r"declares 20,971,520 bytes from [\d,]+ stored bytes") as err:
        load_batch(path)
    assert "nothing was decompressed" in str(err.value) and path.read_bytes() == before


def test_declared_total_above_max_bytes_is_refused(tmp_path):
    torch.save({"input_ids": torch.zeros(1000, dtype=torch.long), "cu_seqlens": torch.tensor([0, 1000])},
               tmp_path / "b.pt")
    with pytest.raises(InputError, match="above the limit of 4,000 bytes"):
        load_batch(tmp_path / "b.pt", max_bytes=4000)
    assert load_batch(tmp_path / "b.pt", max_bytes=1 << 20).row_tokens == 1000


def test_safetensors_header_declaring_huge_tensors_is_refused(tmp_path):
    header = json.dumps({"input_ids": {"dtype": "I64", "shape": [1 << 40], "data_offsets": [0, 8 << 40]}}).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(InputError, match=f"declares {(8 << 40) + len(header) + 8:,} bytes"):
        load_batch(path, max_bytes=1 << 30)


def test_accepted_file_peak_memory_is_about_its_tensors(tmp_path):
    path = tmp_path / "big.pt"
    n = 6_250_000  # 50 MB of int64
    torch.save({"input_ids": torch.zeros(1, n, dtype=torch.long), "cu_seqlens": torch.tensor([0, n])}, path)
    code = ("import resource, sys; from cpinspect.core.loading import load_batch; "
            "r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; b = load_batch(sys.argv[1]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    grown_mb = int(out.stdout.strip()) / 1024
    assert grown_mb <= 1.5 * 50, grown_mb


def test_nan_float_vision_mask_is_refused():
    data = synth.demo_batch_dict()
    data["vision_mask"] = torch.full((336,), float("nan"))
    with pytest.raises(InputError, match="holds NaN"):
        load_batch(data)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint16, torch.int8])
def test_ids_dtype_too_small_for_vision_ids_is_warned(dtype):
    data = {"input_ids": torch.tensor([1, 2, 3], dtype=dtype), "cu_seqlens": torch.tensor([0, 3])}
    note = load_batch(data).notes[0]
    assert note.code == "IDS_DTYPE_TOO_SMALL" and note.severity == "warning"
    assert f"at most {torch.iinfo(dtype).max:,}" in note.message and "151655" in note.message
    assert load_batch({**data, "input_ids": data["input_ids"].to(torch.int32)}).notes == []


def test_column_ids_are_called_a_column():
    with pytest.raises(InputError, match=r"\[32, 1\]: 32 rows of one token each \(a column\)") as err:
        load_batch({"input_ids": torch.zeros(32, 1, dtype=torch.long), "cu_seqlens": torch.tensor([0, 32])})
    assert "batch dimension" not in str(err.value)


def test_text_file_saved_as_pt(tmp_path):
    (tmp_path / "t.pt").write_text("input_ids = [1, 2, 3]\n")
    with pytest.raises(InputError, match="not a torch.save file") as err:
        load_batch(tmp_path / "t.pt")
    assert "Python objects" not in str(err.value)


def test_weights_only_refusal_names_the_class_without_ansi(tmp_path):
    class Config:
        pass

    Config.__module__, Config.__qualname__ = "collections", "Config"
    import collections

    collections.Config = Config
    try:
        torch.save({"input_ids": torch.arange(3), "c": Config()}, tmp_path / "c.pt")
    finally:
        del collections.Config
    with pytest.raises(InputError, match="collections.Config") as err:
        load_batch(tmp_path / "c.pt")
    assert "\x1b" not in str(err.value) and "[1m" not in str(err.value)


def test_symlink_loop_is_not_does_not_exist(tmp_path):
    os.symlink(tmp_path / "loop.pt", tmp_path / "loop.pt")
    with pytest.raises(InputError, match="symbolic link loop"):
        load_batch(tmp_path / "loop.pt")
    os.symlink(tmp_path / "gone.pt", tmp_path / "dangling.pt")
    with pytest.raises(InputError, match="symbolic link to a missing file"):
        load_batch(tmp_path / "dangling.pt")


def test_cu_seqlens_errors_name_the_file(tmp_path):
    torch.save({"input_ids": torch.arange(8), "cu_seqlens": torch.tensor([0, 5, 3])}, tmp_path / "b.pt")
    with pytest.raises(InputError) as err:
        load_batch(tmp_path / "b.pt")
    assert f"Where: {tmp_path / 'b.pt'}, key cu_seqlens" in str(err.value)


def test_odd_grid_names_the_merge_size_rule():
    data = synth.demo_batch_dict()
    grid = data["image_grid_thw"].clone()
    grid[2] = torch.tensor([1, 5, 4])
    with pytest.raises(InputError, match="multiples of the spatial merge size 2"):
        load_batch({**data, "image_grid_thw": grid})


def test_an_unreadable_file_is_one_paragraph_not_an_internal_error(tmp_path, monkeypatch):
    """As root every file is readable, so the refusal the OS would give is injected at open()."""
    import builtins

    from typer.testing import CliRunner

    from cpinspect.cli.app import app

    target = tmp_path / "batch.pt"
    torch.save({"input_ids": torch.arange(8), "cu_seqlens": torch.tensor([0, 8])}, target)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(target):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    result = CliRunner().invoke(app, ["simulate", str(target), "--cp", "2"])
    assert result.exit_code == 2
    assert f"the file {target} cannot be read (permission denied)" in result.output
    assert "Traceback" not in result.output and "\x1b[" not in result.output
