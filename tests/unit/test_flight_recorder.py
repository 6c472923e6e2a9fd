"""``analyze --flight-recorder`` on dumps in torch's own format: divergences, sites, refusals.

The dumps are the real NCCL dump in tests/fixtures (torch 2.11, made by make_nccl_dump.py on a GPU)
with one rank's record changed by hand; the expected kind of each mismatch is what torch's own
flight-recorder matcher (``components.types.Op.match``) says about the same two entries.
"""

import copy
import json
import os
import pickle
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.jobs.flight_recorder import analyze_flight_recorder
from cpinspect.jobs.flight_recorder_read import Frame
from cpinspect.jobs.flight_recorder_sites import BACKWARD, COUNT, VISION_DP, recognise

NCCL = Path(__file__).resolve().parents[1] / "fixtures" / "flight_recorder" / "nccl_torch2.11" / "nccl_trace_rank_0"
TORCH_KIND = {"op": "COLLECTIVE_TYPE_MISMATCH", "shape": "SIZE_OR_SYNTAX_MISMATCH",
              "dtype": "COLLECTIVE_DTYPE_MISMATCH"}


def real_dump(ranks: str = "[0, 1]") -> dict:
    """The NCCL dump, its groups widened to ``ranks`` (it was recorded on one GPU)."""
    dump = pickle.loads(NCCL.read_bytes())
    for config in dump["pg_config"].values():
        config["ranks"] = ranks
    return dump


def write(directory: Path, dumps: dict[int, dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for rank, dump in dumps.items():
        (directory / f"nccl_trace_rank_{rank}").write_bytes(pickle.dumps(dump))
    return directory


def entry(dump: dict, group: str, seq: int) -> dict:
    return next(e for e in dump["entries"] if e["process_group"][0] == group and e["collective_seq_id"] == seq)


def run_cli(*args: str):
    return CliRunner().invoke(app, ["analyze", *args])


def torch_match(a: dict, b: dict, members: set[int]) -> str:
    from torch.distributed.flight_recorder.components.types import Op

    return Op(a, {"g": members}, "g").match(Op(b, {"g": members}, "g")).state.name


def test_the_real_nccl_dump_reads_with_its_groups_and_states():
    report = analyze_flight_recorder(NCCL.parent)
    raw = pickle.loads(NCCL.read_bytes())
    assert report.exit_code == 0 and report.divergences == []
    assert [(g.name, g.desc, g.members, g.inferred) for g in report.groups] == [
        ("0", "default_pg", (0,), False), ("1", "cp", (0,), False)]
    last = max(raw["entries"], key=lambda e: e["record_id"])
    state = report.ranks[0]
    assert state.pending is None
    assert (state.last_completed.op, state.last_completed.seq) == (last["profiling_name"].split(":")[1],
                                                                  last["collective_seq_id"])
    assert [e.op for e in report.dumps[0].entries] == [e["profiling_name"].split(":")[1] for e in raw["entries"]]


def test_a_rank_that_stopped_early_is_the_missing_rank(tmp_path):
    full = real_dump()
    short = copy.deepcopy(full)
    short["entries"] = [e for e in short["entries"]
                        if not (e["process_group"][0] == "1" and e["collective_seq_id"] >= 6)]
    short["pg_status"]["1"]["last_enqueued_collective"] = 5
    result = run_cli("--flight-recorder", str(write(tmp_path, {0: full, 1: short})), "--json")
    assert result.exit_code == 1, result.output
    out = json.loads(result.output)
    first = out["divergences"][0]
    assert out["missing_ranks"] == [1] and first["missing_ranks"] == [1]
    assert (first["group"], first["seq"], first["kind"]) == ("1", 6, "missing_ranks")
    assert first["ranks"]["0"]["op"] == entry(full, "1", 6)["profiling_name"].split(":")[1]
    assert list(first["ranks"]) == ["0"]


@pytest.mark.parametrize("kind, change", [
    ("op", {"profiling_name": "nccl:all_gather", "output_sizes": [[2, 3, 8]]}),
    ("shape", {"input_sizes": [[8, 3]], "output_sizes": [[8, 3]]}),
    ("dtype", {"input_dtypes": ["Half"], "output_dtypes": ["Half"]}),
])
def test_each_mismatch_kind_is_found_where_torch_finds_it(tmp_path, kind, change):
    dumps = {0: real_dump(), 1: real_dump()}
    entry(dumps[1], "1", 7).update(change)  # group cp's all_reduce of the second step
    report = analyze_flight_recorder(write(tmp_path, dumps))
    assert [(d.group.name, d.seq, d.kind, d.differing_ranks) for d in report.divergences] == [("1", 7, kind, (1,))]
    assert torch_match(entry(dumps[0], "1", 7), entry(dumps[1], "1", 7), {0, 1}) == TORCH_KIND[kind]
    assert report.divergences[0].torch_verdict.split(":")[0] == TORCH_KIND[kind]  # torch's words, passed on


def test_all_to_all_may_differ_in_sizes(tmp_path):
    dumps = {0: real_dump(), 1: real_dump()}
    entry(dumps[1], "1", 4).update(input_sizes=[[4]], output_sizes=[[8]])  # uneven splits
    assert analyze_flight_recorder(write(tmp_path, dumps)).divergences == []
    assert torch_match(entry(dumps[0], "1", 4), entry(dumps[1], "1", 4), {0, 1}) == "UNDECIDED"


def test_a_wrapped_ring_buffer_is_compared_from_where_every_rank_starts(tmp_path):
    dumps = {0: real_dump(), 1: real_dump()}
    dumps[1]["entries"] = dumps[1]["entries"][4:]  # its oldest records were overwritten
    entry(dumps[0], "1", 1)["input_sizes"] = [[5]]  # a difference only rank 0 still holds
    assert analyze_flight_recorder(write(tmp_path, dumps)).divergences == []


def test_a_member_without_a_dump_is_named_not_blamed(tmp_path):
    report = analyze_flight_recorder(write(tmp_path, {0: real_dump("[0, 1, 2]"), 1: real_dump("[0, 1, 2]")}))
    assert report.divergences == [] and report.no_dump == {"0": (2,), "1": (2,)}


@pytest.mark.parametrize("payload", ["open", "system"])
def test_a_code_running_pickle_is_refused_and_nothing_runs(tmp_path, payload):
    side = tmp_path / "side-effect"

    class Payload:
        def __reduce__(self):
            return (open, (str(side), "w")) if payload == "open" else (os.system, (f"touch {side}",))

    data = pickle.dumps({"version": "2.10", "entries": [Payload()]})
    pickle.loads(data)  # the payload is live: plain pickle runs it
    assert side.exists()
    side.unlink()
    directory = write(tmp_path / "dumps", {1: real_dump()})
    (directory / "nccl_trace_rank_0").write_bytes(data)
    result = run_cli("--flight-recorder", str(directory))
    assert result.exit_code == 2
    assert "refused to read the dump" in result.output and "nccl_trace_rank_0" in result.output
    assert not side.exists()


def test_a_dump_over_the_size_limit_is_refused(tmp_path):
    result = run_cli("--flight-recorder", str(NCCL.parent), "--max-bytes", "1000")
    assert result.exit_code == 2 and f"{NCCL.stat().st_size:,} bytes" in result.output


@pytest.mark.parametrize("content, words", [
    (b"not a pickle", "not a readable pickle"),
    (pickle.dumps({"version": "2.10"}), "no list under the key 'entries'"),
    (pickle.dumps({"entries": [{"state": "completed"}]}), "lacks the key(s) profiling_name"),
])
def test_malformed_dumps_say_what_is_wrong(tmp_path, content, words):
    (tmp_path / "trace_0").write_bytes(content)
    result = run_cli("--flight-recorder", str(tmp_path))
    assert result.exit_code == 2 and words in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_directories_without_one_set_of_dumps_are_refused(tmp_path):
    assert run_cli("--flight-recorder", str(tmp_path / "absent")).exit_code == 2
    assert run_cli("--flight-recorder", str(tmp_path)).exit_code == 2
    write(tmp_path, {0: real_dump()})
    (tmp_path / "other_0").write_bytes(NCCL.read_bytes())
    result = run_cli("--flight-recorder", str(tmp_path))
    assert result.exit_code == 2 and "2 different name prefixes" in result.output
    assert run_cli(str(tmp_path), "--flight-recorder", str(tmp_path)).exit_code == 2


@pytest.mark.parametrize("path, library", [
    ("/usr/lib/python3/dist-packages/torch/distributed/distributed_c10d.py", True),
    ("/opt/venv/lib/python3.12/site-packages/typing_extensions.py", True),
    ("/opt/venv/lib/python3.12/site-packages/megatron/bridge/models/vision.py", False),
    ("/home/me/torch/train.py", False),  # a folder named torch outside site-packages is the user's
])
def test_torch_frames_are_told_from_the_recorded_path_alone(path, library):
    from cpinspect.jobs.flight_recorder import call_site

    frames = (Frame("f", path, 1), Frame("main", "/job/train.py", 7))
    assert call_site(frames) == ("/job/train.py:7" if library else f"{path}:1")


AUTOGRAD = Frame("apply", "/usr/lib/python3/site-packages/torch/autograd/function.py", 581)


@pytest.mark.parametrize("op, frames, site", [
    ("_all_gather_base", [Frame("_get_cp_local_vision_embed_indices", "/x/megatron/bridge/qwen_vl.py", 9)], COUNT),
    ("all_gather", [Frame("gather", "/site-packages/cpinspect/core/selection.py", 134)], COUNT),
    ("all_gather", [Frame("forward", "/job/model.py", 40), AUTOGRAD], VISION_DP),
    ("all_reduce", [Frame("backward", "/job/model.py", 52), AUTOGRAD], BACKWARD),
    ("all_reduce", [Frame("forward", "/job/model.py", 40), AUTOGRAD], None),
    ("all_gather", [Frame("forward", "/job/model.py", 40), Frame("apply", "/job/mine.py", 3)], None),
    ("all_gather", [Frame("gather", "/job/selection.py", 3)], None),
])
def test_cp_sites_are_named_from_the_function_names(op, frames, site):
    found = recognise(op, tuple(frames))
    assert (found.site if found else None) == site


def test_the_json_form_of_a_dump_reads_like_the_pickle(tmp_path):
    """torch's ``_dump_fr_trace_json`` writes the same keys, collective numbers in pg_status as strings, no frames."""
    dumps = {0: real_dump(), 1: real_dump()}
    entry(dumps[1], "1", 7).update(input_dtypes=["Half"], output_dtypes=["Half"])
    for rank, dump in dumps.items():
        for status in dump["pg_status"].values():
            status.update({key: str(value) for key, value in status.items()})
        for e in dump["entries"]:
            e.pop("frames")
        (tmp_path / f"nccl_trace_rank_{rank}").write_text(json.dumps(dump))
    report = analyze_flight_recorder(tmp_path)
    assert [(d.group.name, d.seq, d.kind, d.differing_ranks) for d in report.divergences] == [("1", 7, "dtype", (1,))]
    assert report.dumps[0].status["1"].last_enqueued == 8


def test_the_text_view_names_the_missing_rank_and_its_last_op(tmp_path):
    full, short = real_dump(), real_dump()
    short["entries"] = short["entries"][:3]  # cp #1, #2, #3: it stopped after the first all-reduce
    short["pg_status"]["1"]["last_enqueued_collective"] = 3
    result = run_cli("--flight-recorder", str(write(tmp_path, {0: full, 1: short})), "--no-color")
    assert result.exit_code == 1
    rows = [line.split("│") for line in result.output.splitlines() if line.count("│") == 5]
    assert [cell.strip() for cell in rows[1]][:2] == ["1", "never entered"]
    assert "its last: all_reduce #3" in rows[1][5]
    words = " ".join(result.output.split())
    assert "rank(s) 1 never entered all_to_all #4 of group 1 (cp), global ranks [0, 1]" in words
