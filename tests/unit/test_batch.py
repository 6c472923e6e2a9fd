"""Loading: aliases, file forms, and refusals with one-paragraph messages."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from cpinspect.core import synth
from cpinspect.core.errors import InputError
from cpinspect.core.loading import load_batch, stacked_shape


def test_aliases_and_flat_or_batched_ids():
    a = load_batch({"tokens": torch.arange(8).view(1, 8), "cu_seqlens_q": torch.tensor([0, 8])})
    b = load_batch({"input_ids": torch.arange(8), "cu_seqlens": torch.tensor([0, 8])})
    assert a.rows[0].tolist() == b.rows[0].tolist() == list(range(8))
    assert a.keys == {"input_ids": "tokens", "cu_seqlens": "cu_seqlens_q"}


def test_padded_cu_is_physical_and_unpadded_is_logical():
    batch = load_batch({"input_ids": torch.zeros(8, dtype=torch.long), "cu_seqlens_q": torch.tensor([0, 3, 6]),
                        "cu_seqlens_q_padded": torch.tensor([0, 4, 8])})
    assert batch.cu_seqlens.tolist() == [0, 4, 8]
    assert batch.logical_cu_seqlens.tolist() == [0, 3, 6]


def test_key_option_maps_other_names():
    batch = load_batch({"ids_local": torch.zeros(4, dtype=torch.long), "boundaries": torch.tensor([0, 4])},
                       keys={"input_ids": "ids_local", "cu_seqlens": "boundaries"})
    assert batch.row_tokens == 4


def test_pt_safetensors_and_rank_directory(tmp_path):
    full = synth.demo_batch_dict()
    torch.save(full, tmp_path / "b.pt")
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "b.safetensors"))
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    for r, shard in enumerate(synth.shard_batch(full, 2)):
        torch.save(shard, ranks / f"rank{r}.pt")
    pt, st, directory = load_batch(tmp_path / "b.pt"), load_batch(tmp_path / "b.safetensors"), load_batch(ranks)
    assert torch.equal(pt.rows[0], st.rows[0])
    assert pt.vision_embed_count == st.vision_embed_count == 124
    assert directory.per_rank_files and directory.form_for(2) == "presharded"
    listed = load_batch([ranks / "rank0.pt", ranks / "rank1.pt"])
    assert all(torch.equal(x, y) for x, y in zip(listed.rows, directory.rows))


def test_pickled_objects_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"input_ids": Payload()}, handle)
    with pytest.raises(InputError, match="refused to load the file"):
        load_batch(path)
    torch.save({"input_ids": Payload(), "cu_seqlens": torch.tensor([0, 1])}, tmp_path / "evil2.pt")
    with pytest.raises(InputError, match="refused to load the file"):
        load_batch(tmp_path / "evil2.pt")
    assert not marker.exists()


@pytest.mark.parametrize("data, text", [
    ({"cu_seqlens": torch.tensor([0, 4])}, "has no input_ids"),
    ({"input_ids": torch.zeros(4, dtype=torch.long)}, "no cu_seqlens"),
    ({"input_ids": torch.zeros(4), "cu_seqlens": torch.tensor([0, 4])}, "token ids must be integers"),
    ({"input_ids": torch.zeros(2, 4, dtype=torch.long), "cu_seqlens": torch.tensor([0, 4])}, "BATCH_NOT_FLAT"),
    ({"input_ids": torch.zeros(1, 1, 4, dtype=torch.long), "cu_seqlens": torch.tensor([0, 4])}, "3 dimensions"),
    ({"input_ids": torch.tensor([1, -100]), "cu_seqlens": torch.tensor([0, 2])}, "negative token id"),
    ({"input_ids": torch.zeros(4, dtype=torch.long), "cu_seqlens": torch.tensor([0.0, 4.0])}, "must be integers"),
    ({"input_ids": torch.zeros(4, dtype=torch.long), "cu_seqlens": torch.tensor([0, 4]),
      "image_grid_thw": torch.tensor([[1, 0, 4]])}, "must be positive"),
])
def test_malformed_dicts_name_the_problem(data, text):
    with pytest.raises(InputError, match=text):
        load_batch(data)


def test_missing_and_duplicate_rank_files(tmp_path):
    shard = synth.shard_batch(synth.demo_batch_dict(), 2)
    torch.save(shard[0], tmp_path / "rank0.pt")
    torch.save(shard[0], tmp_path / "rank2.pt")
    with pytest.raises(InputError, match="rank 1 are missing"):
        load_batch(tmp_path)
    torch.save(shard[1], tmp_path / "rank1.pt")
    torch.save(shard[1], tmp_path / "rank1.safetensors")
    with pytest.raises(InputError, match="rank 1 appears twice"):
        load_batch(tmp_path)


def test_file_problems(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no rank files"):
        load_batch(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        load_batch(tmp_path / "nope.pt")
    (tmp_path / "b.npz").write_bytes(b"x")
    with pytest.raises(InputError, match="unknown file extension"):
        load_batch(tmp_path / "b.npz")
    (tmp_path / "t.pt").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(InputError, match="could not be read"):
        load_batch(tmp_path / "t.pt")
    (tmp_path / "t.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(InputError, match="safetensors file could not be read"):
        load_batch(tmp_path / "t.safetensors")


def test_per_rank_files_must_agree():
    a = {"input_ids": torch.zeros(4, dtype=torch.long), "cu_seqlens": torch.tensor([0, 8])}
    b = {"input_ids": torch.zeros(4, dtype=torch.long), "cu_seqlens": torch.tensor([0, 4, 8])}
    with pytest.raises(InputError, match="disagree on cu_seqlens"):
        load_batch([a, b])
    c = {"input_ids": torch.zeros(5, dtype=torch.long), "cu_seqlens": torch.tensor([0, 8])}
    with pytest.raises(InputError, match="different lengths"):
        load_batch([a, c])


def test_stacked_ids_are_refused_by_default_and_concatenated_on_request():
    rows = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    raw = {"input_ids": torch.tensor(rows), "cu_seqlens": torch.tensor([0, 4, 8, 12]), "labels": torch.zeros(3, 4)}
    with pytest.raises(InputError, match="BATCH_NOT_FLAT"):
        load_batch(raw)
    batch = load_batch(raw, stacked="concatenate")
    assert batch.rows[0].tolist() == [token for row in rows for token in row]
    assert [(f.key, f.shape, f.dtype) for f in batch.found[0]] == [
        ("input_ids", (3, 4), "int64"), ("cu_seqlens", (4,), "int64"), ("labels", (3, 4), "float32")]
    assert stacked_shape(batch) == (3, 4) and stacked_shape(load_batch({**raw, "input_ids": torch.arange(12)})) is None
    assert raw["input_ids"].tolist() == rows  # the caller's tensor is untouched


def test_found_records_every_key_of_every_rank_file(tmp_path):
    for rank in range(2):
        torch.save({"input_ids": torch.arange(4).view(1, 4), "cu_seqlens": torch.tensor([0, 8]),
                    f"only_rank{rank}": torch.ones(rank + 1)}, tmp_path / f"rank{rank}.pt")
    batch = load_batch(tmp_path)
    assert [[(f.key, f.shape) for f in found] for found in batch.found] == [
        [("input_ids", (1, 4)), ("cu_seqlens", (2,)), ("only_rank0", (1,))],
        [("input_ids", (1, 4)), ("cu_seqlens", (2,)), ("only_rank1", (2,))]]


# (rows per file, tokens per row, cu_seqlens[-1]) -> form for cp 2 and 4, and the cp the rows were cut for,
# written out from the rule: full when one row holds cu_seqlens[-1] tokens; pre-sharded for cp when
# cu_seqlens[-1] == cp x row; cut for the number of rank files, or cu_seqlens[-1] / row (> 1) for one row.
FORMS = [
    (1, 16, 16, "full", "full", None),
    (1, 8, 16, "presharded", "neither", 2),
    (1, 4, 16, "neither", "presharded", 4),
    (1, 6, 16, "neither", "neither", None),
    (2, 8, 16, "presharded", "neither", 2),
    (2, 8, 32, "neither", "presharded", 2),
    (4, 4, 16, "neither", "presharded", 4),
]


@pytest.mark.parametrize(("files", "row", "total", "for2", "for4", "cut"), FORMS)
def test_one_input_form_rule(files, row, total, for2, for4, cut):
    parts = [{"input_ids": torch.zeros(row, dtype=torch.long), "cu_seqlens": torch.tensor([0, total])}
             for _ in range(files)]
    batch = load_batch(parts if files > 1 else parts[0])
    assert (batch.form_for(2), batch.form_for(4), batch.cut_for()) == (for2, for4, cut)
    assert batch.is_full == (for2 == "full")
