"""`cpinspect explore` without a browser: the page file, what it embeds, its size, its errors.

What the page's script computes is checked in a real browser by tests/process/test_explore_browser.py.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bench.batches import packed_batch
from cpinspect.cli.app import app
from cpinspect.core import synth
from cpinspect.core.loading import load_batch
from cpinspect.core.tokens import AUDIO_PAD, IMAGE_PAD, VIDEO_PAD
from cpinspect.explore import DETAIL_TOKENS, vision_spans
from cpinspect.simulation.run import simulate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qwen3vl_packed.pt"
runner = CliRunner()


def page_of(args, tmp_path, name="page.html"):
    out = tmp_path / name
    result = runner.invoke(app, ["explore", *args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out.read_text(encoding="utf-8")


def embedded(page):
    return json.loads(re.search(r'<script type="application/json" id="cpx-data">(.*?)</script>', page, re.S)[1])


def expand(runs):
    return [v for a, b in runs for v in range(a, b + 1)]


def cli_json(args):
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_help_does_not_import_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "cpinspect", "explore", "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--output" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not any(name == "torch" or name.startswith("torch.") for name in imported)


def test_example_page_is_one_small_self_contained_file(tmp_path):
    page = page_of([str(EXAMPLE), "--cp", "2"], tmp_path)
    assert len(page.encode()) < 500_000
    assert "default-src 'none'" in page  # the browser itself refuses any fetch
    for external in ("http://", "https://", "<link", "@import", "url(", " src="):
        assert external not in page, external
    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts == ['<script type="application/json" id="cpx-data">', '<script type="application/json" '
                       'id="cpx-model">', "<script>"]


def test_embedded_numbers_are_the_cli_json(tmp_path):
    data = embedded(page_of([str(EXAMPLE), "--cp", "4"], tmp_path))
    sim = cli_json(["simulate", str(EXAMPLE), "--cp", "4"])
    lay = cli_json(["layout", str(EXAMPLE), "--cp", "4"])
    mine = data["cli"]["simulate"]
    assert mine["gathered_counts"] == sim["gathered_counts"]
    for got, want in zip(mine["ranks"], sim["ranks"], strict=True):
        assert expand(got["global_indices"]) == want["global_indices"]
        assert expand(got["vision_positions"]) == want["vision_positions"]
        assert expand(got["selected_rows"]) == want["selected_rows"]
        assert got["local_counts"] == want["local_counts"]
    assert data["cli"]["layout"]["balance"] == lay["balance"]
    assert data["cli"]["layout"]["segments"] == lay["segments"]
    assert data["initial"] == {"cp": 4, "layout": "zigzag", "pad": False, "seqlens": [96, 48, 144, 48],
                               "spans": data["initial"]["spans"]}
    assert data["cli"]["commands"][0] == f"cpinspect simulate {EXAMPLE} --cp 4 --json"


def literal_spans(ids, mask, cu):
    """Runs of vision tokens, token by token: cut at segment starts and where image/video changes."""
    spans, starts = [], set(cu[:-1])
    for p in range(len(mask)):
        if not mask[p]:
            continue
        kind = "video" if ids[p] == VIDEO_PAD else "audio" if ids[p] == AUDIO_PAD else "image"
        seg = max(s for s in range(len(cu) - 1) if cu[s] <= p)
        if spans and p not in starts and spans[-1][3] == kind and spans[-1][0] == seg and \
                cu[seg] + spans[-1][1] + spans[-1][2] == p:
            spans[-1][2] += 1
        else:
            spans.append([seg, p - cu[seg], 1, kind])
    return spans


@pytest.mark.parametrize("seed", range(6))
def test_vision_spans_are_the_mask_runs(seed):
    batch = load_batch(synth.random_batch(seed, 2)) if seed else synth.demo_batch()
    result = simulate(batch, 2)
    want = literal_spans(result.full_ids.tolist(), result.full_mask.tolist(), result.layout.cu_seqlens.tolist())
    assert vision_spans(result) == want


def test_audio_placeholders_are_spans_of_their_own_kind(tmp_path):
    from cpinspect.core.tokens import token_config

    ids = [100, IMAGE_PAD, IMAGE_PAD, IMAGE_PAD, IMAGE_PAD, 101, AUDIO_PAD, AUDIO_PAD] + [AUDIO_PAD] * 3 + [102] * 5
    batch = load_batch({"input_ids": torch.tensor(ids), "cu_seqlens": torch.tensor([0, 8, 16]),
                        "image_grid_thw": torch.tensor([[1, 4, 4]])})
    result = simulate(batch, 2, tokens=token_config("qwen3-omni"))
    want = literal_spans(ids, result.full_mask.tolist(), [0, 8, 16])
    assert [s[3] for s in want] == ["image", "audio", "audio"]  # the audio run is cut at the segment start
    assert vision_spans(result) == want
    out = tmp_path / "omni.html"
    torch.save({"input_ids": torch.tensor(ids).view(1, -1), "cu_seqlens": torch.tensor([0, 8, 16]),
                "image_grid_thw": torch.tensor([[1, 4, 4]])}, tmp_path / "omni.pt")
    shown = runner.invoke(app, ["explore", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                "-o", str(out)])
    assert shown.exit_code == 0, shown.output
    assert '"audio"' in out.read_text(encoding="utf-8")


def test_padded_setting_keeps_spans_relative_to_segments(tmp_path):
    data = embedded(page_of(["--seqlens", "12,20", "--cp", "4", "--pad"], tmp_path))
    assert data["initial"] == {"cp": 4, "layout": "zigzag", "pad": True, "seqlens": [12, 20], "spans": []}
    assert expand(data["cli"]["simulate"]["ranks"][0]["global_indices"]) == [0, 1, 14, 15, 16, 17, 18, 37, 38, 39]


@pytest.mark.parametrize("args, message", [
    (["--seqlens", "8", str(EXAMPLE)], "both --seqlens and a batch"),
    (["--seqlens", "12,20", "--cp", "4"], "not divisible by 2*cp = 8"),
    (["--seqlens", "8,x"], "--seqlens entry 1 is 'x'"),
    (["--cp", "17"], "more than the explorer draws"),
])
def test_bad_input_is_one_paragraph_and_exit_2(args, message, tmp_path):
    result = runner.invoke(app, ["explore", *args, "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.html").exists()


def test_missing_output_folder_is_exit_2(tmp_path):
    result = runner.invoke(app, ["explore", "-o", str(tmp_path / "no" / "x.html")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_million_token_batch_writes_a_usable_page_quickly(tmp_path):
    path = tmp_path / "big.pt"
    torch.save(packed_batch(1 << 20, 600, multiple=32, seed=1), path)
    started = time.perf_counter()
    page = page_of([str(path), "--cp", "8", "--from", "500000"], tmp_path, "big.html")
    elapsed = time.perf_counter() - started
    assert elapsed < 20, elapsed  # ~2 s on an idle 2-core machine; generous for a loaded one
    assert len(page.encode()) < 2_000_000
    data = embedded(page)
    assert data["start"] == 500000 and data["detail_tokens"] == DETAIL_TOKENS < 1 << 20
    assert f"longer than {DETAIL_TOKENS:,} tokens is drawn a range at a time" in (ROOT / "README.md").read_text()
    assert sum(len(expand(r["global_indices"])) for r in data["cli"]["simulate"]["ranks"]) == 1 << 20
    assert sum(n for _, _, n, _ in data["initial"]["spans"]) == int(torch.load(path)["vision_embed_count"])


def hybrid_batch(tmp_path, local_cp_size):
    ids = torch.full((1, 48), 100)
    ids[0, 3:9], ids[0, 20:30] = IMAGE_PAD, VIDEO_PAD
    path = tmp_path / "hybrid.pt"
    torch.save({"input_ids": ids, "cu_seqlens": torch.tensor([0, 16, 24, 32, 48], dtype=torch.int32),
                "local_cp_size": torch.tensor(local_cp_size, dtype=torch.int32)}, path)
    return path, ids.view(-1).tolist()


def test_a_hybrid_mix_of_local_cp_sizes_is_refused_not_drawn_as_another_layout(tmp_path):
    """The page models the named layouts only: it used to write a page that crashed in the browser."""
    path, _ = hybrid_batch(tmp_path, [2, 1, 1, 4])
    result = runner.invoke(app, ["explore", str(path), "--cp", "4", "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "local_cp_size (hybrid CP, local sizes 1, 2, 4 of --cp 4)" in result.output
    assert "cpinspect simulate BATCH --cp 4" in result.output
    assert not (tmp_path / "x.html").exists()


def test_local_cp_size_of_the_whole_group_is_drawn_as_per_document_zigzag(tmp_path):
    from tests.literal import expected_rows, zigzag_indices

    path, ids = hybrid_batch(tmp_path, 4)
    data = embedded(page_of([str(path), "--cp", "4"], tmp_path))
    held = zigzag_indices([0, 16, 24, 32, 48], 4)
    mask = [t in (IMAGE_PAD, VIDEO_PAD) for t in ids]
    ranks = data["cli"]["simulate"]["ranks"]
    assert [expand(r["global_indices"]) for r in ranks] == held
    assert [expand(r["selected_rows"]) for r in ranks] == [expected_rows(mask, h) for h in held]
    assert all(c.endswith("--json on the batch without its local_cp_size (every segment on all 4 ranks: zigzag)")
               for c in data["cli"]["commands"])  # what the page checks itself against, said as it is
    other = runner.invoke(app, ["explore", str(path), "--cp", "4", "--layout", "contiguous", "-o",
                                str(tmp_path / "y.html")])
    assert other.exit_code == 2 and "per-document zigzag, but --layout contiguous was asked" in other.output
