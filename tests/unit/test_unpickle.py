"""Framework objects (PackedSeqParams, verl containers) load through inert stand-ins; payloads are refused."""

import dataclasses
import os
import sys
import types

import pytest
import torch

from cpinspect.core.errors import InputError
from cpinspect.core.loading import load_batch
from cpinspect.core.unpickle import StandIn


@pytest.fixture
def fake_module():
    """A module ``megatron.core.packed_seq_params`` that exists only while saving (never when loading)."""
    names = ["megatron", "megatron.core", "megatron.core.packed_seq_params"]
    mod = types.ModuleType(names[-1])

    @dataclasses.dataclass
    class PackedSeqParams:
        qkv_format: str = "thd"
        cu_seqlens_q: torch.Tensor | None = None
        cu_seqlens_kv: torch.Tensor | None = None
        cu_seqlens_q_padded: torch.Tensor | None = None
        cu_seqlens_kv_padded: torch.Tensor | None = None
        max_seqlen_q: int | None = None
        max_seqlen_kv: int | None = None
        local_cp_size: int | None = None

    PackedSeqParams.__module__, PackedSeqParams.__qualname__ = names[-1], "PackedSeqParams"
    mod.PackedSeqParams = PackedSeqParams
    for name in names:
        sys.modules[name] = mod if name == names[-1] else types.ModuleType(name)
    yield mod
    for name in names:
        sys.modules.pop(name, None)


def _save_without_module(obj, path):
    torch.save(obj, path)
    for name in ["megatron", "megatron.core", "megatron.core.packed_seq_params"]:
        sys.modules.pop(name, None)


def test_packed_seq_params_padded_loads_without_its_module(fake_module, tmp_path):
    psp = fake_module.PackedSeqParams(cu_seqlens_q=torch.tensor([0, 3, 7]), cu_seqlens_kv=torch.tensor([0, 3, 7]),
                                      cu_seqlens_q_padded=torch.tensor([0, 4, 8]),
                                      cu_seqlens_kv_padded=torch.tensor([0, 4, 8]), max_seqlen_q=4, local_cp_size=2)
    _save_without_module({"input_ids": torch.arange(8).view(1, 8), "packed_seq_params": psp}, tmp_path / "b.pt")
    batch = load_batch(tmp_path / "b.pt")
    assert "megatron.core.packed_seq_params" not in sys.modules
    assert batch.cu_seqlens.tolist() == [0, 4, 8]
    assert batch.logical_cu_seqlens.tolist() == [0, 3, 7]
    assert batch.keys["cu_seqlens"] == "packed_seq_params.cu_seqlens_q_padded"
    assert batch.keys["logical_cu_seqlens"] == "packed_seq_params.cu_seqlens_q"
    assert batch.rows[0].tolist() == list(range(8))


def test_packed_seq_params_unpadded_uses_cu_seqlens_q_as_physical(fake_module, tmp_path):
    psp = fake_module.PackedSeqParams(cu_seqlens_q=torch.tensor([0, 4, 8]), cu_seqlens_kv=torch.tensor([0, 4, 8]))
    _save_without_module({"tokens": torch.arange(8), "packed_seq_params": psp}, tmp_path / "b.pt")
    batch = load_batch(tmp_path / "b.pt")
    assert batch.cu_seqlens.tolist() == [0, 4, 8] and batch.logical_cu_seqlens is None
    assert batch.keys["cu_seqlens"] == "packed_seq_params.cu_seqlens_q"


def test_dotted_key_and_nested_dicts(tmp_path):
    raw = {"batch": {"tokens_local": torch.arange(8)},
           "model_inputs": {"packed": {"bounds": torch.tensor([0, 2, 8]), "cu_seqlens": torch.tensor([0, 8])}}}
    torch.save(raw, tmp_path / "n.pt")
    batch = load_batch(tmp_path / "n.pt", keys={"input_ids": "batch.tokens_local",
                                                 "cu_seqlens": "model_inputs.packed.bounds"})
    assert batch.cu_seqlens.tolist() == [0, 2, 8] and batch.rows[0].tolist() == list(range(8))
    plain = load_batch(tmp_path / "n.pt", keys={"input_ids": "batch.tokens_local"})
    assert plain.cu_seqlens.tolist() == [0, 8] and plain.keys["cu_seqlens"] == "model_inputs.packed.cu_seqlens"
    with pytest.raises(InputError, match="no such key or path"):
        load_batch(tmp_path / "n.pt", keys={"input_ids": "batch.nope"})


class _System:
    """Pickles as a call to os.system (the classic payload)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_payload_hidden_inside_an_allowed_object_is_refused(fake_module, tmp_path):
    marker = tmp_path / "pwned"
    psp = fake_module.PackedSeqParams(cu_seqlens_q=torch.tensor([0, 8]), max_seqlen_q=_System(marker))
    _save_without_module({"input_ids": torch.arange(8), "packed_seq_params": psp}, tmp_path / "evil.pt")
    before = (tmp_path / "evil.pt").read_bytes()
    with pytest.raises(InputError) as err:
        load_batch(tmp_path / "evil.pt")
    text = str(err.value)
    assert "system" in text and "nothing from the file was executed" in text and "\x1b" not in text
    assert not marker.exists() and (tmp_path / "evil.pt").read_bytes() == before


def test_class_named_like_a_dataclass_in_module_os_is_refused(tmp_path):
    class PackedSeqParams:
        pass

    PackedSeqParams.__module__, PackedSeqParams.__qualname__ = "os", "PackedSeqParams"
    os.PackedSeqParams = PackedSeqParams
    try:
        torch.save({"input_ids": torch.arange(4), "p": PackedSeqParams()}, tmp_path / "evil.pt")
    finally:
        del os.PackedSeqParams
    with pytest.raises(InputError, match="os.PackedSeqParams comes from the module os"):
        load_batch(tmp_path / "evil.pt")


def test_a_stand_in_that_would_be_called_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    mod = types.ModuleType("evilpkg")

    class Runner:
        def __init__(self, command):
            open(command, "w").close()

    Runner.__module__, Runner.__qualname__ = "evilpkg", "Runner"
    mod.Runner = Runner

    class Call:
        def __reduce__(self):
            return (Runner, (str(marker),))

    sys.modules["evilpkg"] = mod
    try:
        torch.save({"input_ids": torch.arange(4), "cu_seqlens": torch.tensor([0, 4]), "x": Call()}, tmp_path / "e.pt")
    finally:
        del sys.modules["evilpkg"]
    with pytest.raises(InputError, match=r"calls evilpkg.Runner\(\.\.\.\)"):
        load_batch(tmp_path / "e.pt")
    assert not marker.exists() and "evilpkg" not in sys.modules


def test_stand_in_holds_only_state():
    cls = type("Thing", (StandIn,), {"_class_path": "pkg.Thing"})
    inst = cls.__new__(cls)
    inst.__setstate__({"a": 1})
    assert inst.fields == {"a": 1} and inst.class_path == "pkg.Thing"
    with pytest.raises(Exception, match="never does"):
        cls(1)
