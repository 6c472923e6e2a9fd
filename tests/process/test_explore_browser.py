"""The explorer page in a real headless Chromium: what the DOM shows equals the CLI's JSON.

Settings are typed into the page's own controls; the expected numbers come from the library
in-process (``simulate`` = ``cpinspect simulate --json``, ``layout_document`` = ``cpinspect layout
--json``) and, for hovering, from the oracle (cpinspect.core.oracle) and direct index mapping.
Skipped, with the reason, where selenium or a system Chromium + chromedriver is missing
(``apt-get install chromium chromium-driver``; ``pip install selenium``).
"""

import importlib.util
import itertools
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.balance import compare_layouts
from cpinspect.core.errors import InputError
from cpinspect.core.layout import LAYOUTS
from cpinspect.core.layout_report import layout_document
from cpinspect.core.loading import load_batch
from cpinspect.core.ranges import format_ranges
from cpinspect.core.tokens import IMAGE_PAD, VIDEO_PAD
from cpinspect.simulation.run import simulate
from cpinspect.views.simulate import RANK_LETTERS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qwen3vl_packed.pt"


def _screenshots_module():
    spec = importlib.util.spec_from_file_location("make_screenshots", ROOT / "docs" / "make_screenshots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SHOTS = _screenshots_module()
FOUND = SHOTS.find_browser()
pytestmark = pytest.mark.skipif(isinstance(FOUND, str), reason=f"browser test skipped: {FOUND}")

READ_BACK = """
const q = (sel, root) => Array.from((root || document).querySelectorAll(sel));
const error = document.getElementById('cpx-error');
return {
  model: JSON.parse(document.getElementById('cpx-model').textContent),
  error: error.hidden ? null : error.textContent,
  owners: q('#cpx-row .t[data-g]').map(c => [+c.dataset.g, c.textContent]),
  local: q('#cpx-local .local').map(row => q('.t[data-g]', row).map(c => [+c.dataset.g, +c.dataset.l, c.textContent])),
  counts: q('#cpx-counts td[data-count]').map(c => [+c.dataset.seg, +c.dataset.chunk, c.firstChild.textContent]),
  rows: q('#cpx-rows li[data-rank]').map(li => [li.dataset.rows ? JSON.parse(li.dataset.rows) : null, li.textContent]),
  work: Object.fromEntries(q('#cpx-work [data-layout]').map(b => [b.dataset.layout,
    b.dataset.work ? [JSON.parse(b.dataset.work), +b.dataset.imbalance] : null])),
};
"""


@pytest.fixture(scope="module")
def driver():
    browser = SHOTS.start_browser()
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def example_page(tmp_path_factory):
    return SHOTS.write_page(2, tmp_path_factory.mktemp("explore") / "example.html")


def open_page(driver, page):
    driver.get(page.resolve().as_uri())
    driver.get_log("browser")  # drain: each test reads only its own messages


def test_page_loads_from_file_without_console_errors_or_network(driver, example_page):
    driver.get(example_page.resolve().as_uri())
    logs = driver.get_log("browser")
    assert [entry for entry in logs if entry["level"] in ("SEVERE", "WARNING")] == []
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(("file:", "data:")) for name in resources), resources
    badge = driver.find_element("id", "cpx-check")
    assert badge.get_attribute("data-checked") == "equal", badge.text
    assert driver.execute_script("return Object.keys(CPX.LAYOUTS)") == list(LAYOUTS)


def batch_of(setting):
    """The batch the setting describes: text everywhere, image_pad / video_pad on the spans."""
    cu = torch.cumsum(torch.tensor([0, *setting["seqlens"]]), 0)
    ids = torch.full((int(cu[-1]),), 100)
    for seg, start, length, kind in setting["spans"]:
        at = int(cu[seg]) + start
        ids[at:at + length] = VIDEO_PAD if kind == "video" else IMAGE_PAD
    return load_batch({"input_ids": ids.view(1, -1), "cu_seqlens": cu.to(torch.int32)})


def random_setting(rng, i):
    """Setting ``i``: every layout, with and without pad, a third of them with lengths it may not divide."""
    cp = rng.choice([1, 2, 2, 3, 4, 4, 5, 6, 8, 16])
    kind = LAYOUTS[i % len(LAYOUTS)]
    unit = cp if kind == "contiguous" else 2 * cp
    segments = rng.randint(1, 5)
    if (i // (2 * len(LAYOUTS))) % 3 == 0:  # lengths the layout may not divide: the pad toggle or an error
        lengths = [rng.randint(1, 300 // segments + 1) for _ in range(segments)]
    else:
        lengths = [unit * rng.randint(1, max(1, 320 // (unit * segments))) for _ in range(segments)]
    spans = []
    for seg, length in enumerate(lengths):
        at = 0
        for _ in range(rng.randint(0, 2)):
            if at >= length:
                break
            start = rng.randint(at, length - 1)
            size = rng.randint(1, length - start)
            spans.append([seg, start, size, rng.choice(["image", "video"])])
            at = start + size + 1
    return {"cp": cp, "layout": kind, "pad": (i // len(LAYOUTS)) % 2 == 1, "seqlens": lengths, "spans": spans}


def enter(driver, setting):
    """Type the setting into the page's controls, as a person would."""
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def typed(element_id, text):
        field = driver.find_element("id", element_id)
        field.clear()
        field.send_keys(text)

    typed("cpx-cp", str(setting["cp"]))
    Select(driver.find_element("id", "cpx-layout")).select_by_value(setting["layout"])
    pad = driver.find_element("id", "cpx-pad")
    if pad.is_selected() != setting["pad"]:
        pad.click()
    typed("cpx-seqlens", ",".join(map(str, setting["seqlens"])))
    typed("cpx-spans", ", ".join(f"{s}:{a}+{n} {k}" for s, a, n, k in setting["spans"]))
    WebDriverWait(driver, 10, poll_frequency=0.05).until(lambda d: json.loads(
        d.find_element("id", "cpx-model").get_attribute("textContent"))["setting"] == setting)


def cli_json(setting):
    """``simulate --json`` and ``layout --json`` for the setting, or the CLI's error."""
    try:
        result = simulate(batch_of(setting), setting["cp"], setting["layout"], pad=setting["pad"])
    except InputError as exc:
        return None, None, exc
    balances, _ = compare_layouts(result.layout.cu_seqlens, setting["cp"])
    return result.to_dict(), layout_document(result.layout, balances), None


def check_shown(shown, sim, lay):
    cp = sim["cp"]
    owner = {}
    for entry in sim["ranks"]:
        for g in entry["global_indices"]:
            owner[g] = entry["rank"]
    assert shown["owners"] == [[g, RANK_LETTERS[owner[g]]] for g in range(sim["tokens"])]
    assert len(shown["local"]) == cp
    for entry, cells in zip(sim["ranks"], shown["local"]):
        assert [c[0] for c in cells] == entry["global_indices"]
        assert [c[1] for c in cells] == list(range(len(cells)))
        assert {c[2] for c in cells} <= {RANK_LETTERS[entry["rank"]]}
    # The count table: [S, 2cp] for zigzag, else one row of every piece (cp x the pieces each rank sends).
    table = sim["gathered_counts"]
    sent = [x for c in sim["ranks"][0]["local_counts"] for x in (c if isinstance(c, list) else [c])]
    assert [len(row) for row in table] == ([2 * cp] * sim["segments"] if sim["layout"] == "zigzag"
                                           else [cp * len(sent)])
    assert [[s, c, str(n)] for s, row in enumerate(table) for c, n in enumerate(row)] == shown["counts"]
    for entry, (rows, text) in zip(sim["ranks"], shown["rows"]):
        assert rows == entry["selected_rows"]
        assert f"rows {format_ranges(torch.tensor(rows, dtype=torch.long), limit=12)}" in text
    for kind in LAYOUTS:
        if kind in lay["balance"]:
            work, imbalance = shown["work"][kind]
            assert work == lay["balance"][kind]["work"]
            assert imbalance == pytest.approx(lay["balance"][kind]["imbalance"], rel=1e-12)
        else:
            assert shown["work"][kind] is None
    for entry, mine in zip(sim["ranks"], shown["model"]["ranks"]):
        assert mine["vision_positions"] == entry["vision_positions"]
        counts = entry["local_counts"]  # [rows, 2] for layouts holding chunk pairs, flat otherwise
        paired = sim["layout"] in ("zigzag", "sequence-zigzag", "head-tail")
        assert all(isinstance(c, list) and len(c) == 2 for c in counts) if paired else \
            all(isinstance(c, int) for c in counts)
        flat = [x for pair in counts for x in pair] if paired else counts
        assert mine["local_counts"] == flat


def test_random_settings_through_the_controls_equal_the_cli_json(driver, example_page):
    open_page(driver, example_page)
    rng = random.Random(2026)
    checked = errors = padded = 0
    per_layout = dict.fromkeys(LAYOUTS, 0)
    for i in itertools.count():
        if checked >= 50 and padded >= 6:
            break
        setting = random_setting(rng, i)
        enter(driver, setting)
        shown = driver.execute_script(READ_BACK)
        sim, lay, error = cli_json(setting)
        if error is not None:
            assert shown["error"] and shown["model"]["error"], (setting, error.what)
            errors += 1
            continue
        assert shown["error"] is None, (setting, shown["error"])
        assert shown["model"]["cu"] == [0, *torch.cumsum(torch.tensor([
            s["length"] for s in lay["segments"]]), 0).tolist()]
        check_shown(shown, sim, lay)
        checked += 1
        per_layout[setting["layout"]] += 1
        padded += setting["pad"] and shown["model"]["cu"][-1] > sum(setting["seqlens"])
    assert driver.get_log("browser") == []
    assert errors >= 1  # some settings the layout cannot cut were tried, and the page said so
    assert min(per_layout.values()) >= 5, per_layout  # every layout, per-document-head-tail included


def token_facts(result, g):
    """Segment, chunk, rank, local index and embedding row of global token g, from the layout tensors."""
    layout = result.layout
    ends = layout.piece_start + layout.piece_len
    piece = int(torch.nonzero((layout.piece_start <= g) & (g < ends))[0])
    rank = int(layout.owner_of_piece()[piece])
    local = int(torch.nonzero(layout.global_indices(rank) == g)[0])
    rank_result = result.ranks[rank]
    vision = torch.nonzero(rank_result.vision_positions == local).view(-1)
    row = int(rank_result.expected_rows[int(vision[0])]) if vision.numel() else None
    segment = int(torch.searchsorted(layout.cu_seqlens, torch.tensor(g), right=True)) - 1
    return {"global": g, "segment": segment, "chunk": int(layout.piece_chunk[piece]), "rank": rank,
            "local": local, "row": row}


def test_hover_shows_the_same_numbers_in_every_view(driver, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    page = SHOTS.write_page(4, tmp_path / "cp4.html")
    open_page(driver, page)
    result = simulate(load_batch(EXAMPLE), 4)
    rng = random.Random(4)
    for g in [0, 335, 20, 100, *rng.sample(range(336), 16)]:
        for view in ("cpx-row", "cpx-local"):
            cell = driver.find_element("css selector", f'#{view} [data-g="{g}"]')
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
            ActionChains(driver).move_to_element(cell).perform()
            box = driver.find_element("id", "cpx-inspect")
            shown = {key: box.get_attribute(f"data-{key}") for key in ("global", "segment", "chunk", "rank", "local",
                                                                         "row")}
            want = token_facts(result, g)
            assert shown == {k: "" if v is None else str(v) for k, v in want.items()}, (g, view)
            lit = driver.execute_script("return Array.from(document.querySelectorAll('.hl')).map(c => "
                                        "c.dataset.g !== undefined ? 'g' + c.dataset.g : 'row' + c.dataset.row)")
            row = [f"row{want['row']}"] if want["row"] is not None else []
            assert sorted(lit) == sorted([f"g{g}", f"g{g}", *row])  # the same token in row, local row, rows
    vision_at = torch.nonzero(result.full_mask).view(-1).tolist()  # embedding row j is the j-th vision token
    for j in [0, 123, *rng.sample(range(124), 6)]:
        cell = driver.find_element("css selector", f'#cpx-rows [data-row="{j}"]')
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
        ActionChains(driver).move_to_element(cell).perform()
        box = driver.find_element("id", "cpx-inspect")
        assert (box.get_attribute("data-row"), box.get_attribute("data-global")) == (str(j), str(vision_at[j]))
    assert driver.get_log("browser") == []


def test_keyboard_moves_the_token_cursor_and_the_stepper(driver, example_page):
    from selenium.webdriver.common.keys import Keys

    open_page(driver, example_page)
    row = driver.find_element("id", "cpx-row")
    row.send_keys(Keys.ARROW_RIGHT)
    box = driver.find_element("id", "cpx-inspect")
    assert box.get_attribute("data-global") == "0"
    row.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_DOWN)
    assert box.get_attribute("data-global") == str(2 + 32)
    steps = driver.find_element("id", "cpx-steps")
    step = driver.find_element("id", "cpx-step")
    assert step.get_attribute("data-step") == "1"
    for _ in range(8):
        steps.send_keys(Keys.ARROW_RIGHT)
    assert step.get_attribute("data-step") == "7"
    assert "RuntimeError: shape mismatch" in step.text  # PyTorch's own words, embedded for this setting
    steps.send_keys(Keys.ARROW_LEFT)
    assert step.get_attribute("data-step") == "6"


def test_stepper_numbers_are_the_explain_numbers(driver, example_page):
    open_page(driver, example_page)
    result = simulate(load_batch(EXAMPLE), 2)
    texts = []
    for i in range(7):
        driver.find_element("css selector", f'#cpx-steptabs [data-step="{i}"]').click()
        texts.append(driver.find_element("id", "cpx-step").text)
    rank0 = result.ranks[0]
    assert f"rows = {format_ranges(rank0.selected_rows)}" in texts[5]
    assert f"local_counts [S, 2] = [4, 2]: {rank0.selection.local_counts.view(-1, 2).tolist()}".replace(" ", "") in \
        texts[1].replace(" ", "")
    assert f"Σ = {result.vision_tokens} vision tokens, which equals the {result.vision_embed_count} rows" in texts[3]
    assert f"rank 1 sent {result.ranks[1].selection.local_counts.view(-1, 2).tolist()}".replace(" ", "") in \
        texts[2].replace(" ", "")


def test_phone_width_has_no_page_wide_scrolling(tmp_path, example_page):
    phone = SHOTS.start_browser(390, 844)
    try:
        phone.get(example_page.resolve().as_uri())
        assert phone.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        phone.save_screenshot(str(tmp_path / "phone.png"))
    finally:
        phone.quit()


def test_screenshots_script_photographs_cp2_and_cp4(driver, tmp_path):
    written = SHOTS.make_all(tmp_path, driver)
    assert [p.name for p in written] == ["explore-cp2.png", "explore-cp4.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    for target in SHOTS.SHOTS.values():
        assert target.exists(), f"{target} is missing: run python docs/make_screenshots.py"


def test_cli_explore_with_seqlens_checks_itself_in_the_browser(driver, tmp_path):
    page = tmp_path / "seqlens.html"
    result = CliRunner().invoke(app, ["explore", "--seqlens", "12,20", "--cp", "4", "--pad", "-o", str(page)])
    assert result.exit_code == 0, result.output
    open_page(driver, page)
    assert driver.find_element("id", "cpx-check").get_attribute("data-checked") == "equal"
    shown = driver.execute_script(READ_BACK)
    assert shown["model"]["cu"] == [0, 16, 40]


def test_million_token_page_loads_and_draws_a_chosen_range(driver, tmp_path):
    import time

    from selenium.webdriver.support.ui import WebDriverWait

    from bench.batches import packed_batch
    from cpinspect.core.layout import make_layout

    batch = packed_batch(1 << 20, 600, multiple=32, seed=1)
    torch.save(batch, tmp_path / "big.pt")
    page = tmp_path / "big.html"
    result = CliRunner().invoke(app, ["explore", str(tmp_path / "big.pt"), "--cp", "8", "-o", str(page)])
    assert result.exit_code == 0, result.output
    started = time.perf_counter()
    open_page(driver, page)
    badge = driver.find_element("id", "cpx-check")
    assert badge.get_attribute("data-checked") == "equal", badge.text  # 1M tokens checked against the CLI's JSON
    assert time.perf_counter() - started < 30
    field = driver.find_element("id", "cpx-from")
    field.clear()
    field.send_keys("700000")
    WebDriverWait(driver, 10).until(lambda d: d.find_element("css selector", "#cpx-row .t[data-g]")
                                    .get_attribute("data-g") == "700000")
    shown = driver.execute_script(READ_BACK)
    layout = make_layout(batch["cu_seqlens"].long(), 8)
    owner = torch.empty(1 << 20, dtype=torch.long)
    owner[layout.all_global_indices()] = torch.arange(8)[:, None]
    cells = shown["owners"]
    assert [g for g, _ in cells] == list(range(700000, 700000 + len(cells))) and len(cells) >= 1024
    assert [letter for _, letter in cells] == [RANK_LETTERS[r] for r in owner[700000:700000 + len(cells)].tolist()]
    assert shown["model"]["gathered_counts"] == simulate(load_batch(batch), 8).gathered_counts.tolist()
    assert driver.get_log("browser") == []


@pytest.mark.parametrize("args", [
    ["examples/presharded_cp2", "--cp", "2"],
    ["examples/qwen3vl_packed.pt", "--cp", "5", "--pad"],
    ["examples/qwen3vl_packed.pt", "--cp", "3", "--layout", "contiguous"],
    ["examples/qwen3vl_packed.pt", "--cp", "16", "--layout", "sequence-zigzag", "--pad"],
    ["examples/qwen3vl_packed.pt", "--cp", "3", "--layout", "per-document-head-tail", "--pad"],
    ["--seqlens", "16,48,8,24", "--cp", "4", "--layout", "per-document-head-tail"],
    ["--cp", "1"],
])
def test_pages_built_for_other_settings_check_themselves_equal(driver, tmp_path, args, monkeypatch):
    monkeypatch.chdir(ROOT)
    page = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["explore", *args, "-o", str(page)])
    assert result.exit_code == 0, result.output
    open_page(driver, page)
    badge = driver.find_element("id", "cpx-check")
    assert badge.get_attribute("data-checked") == "equal", badge.text
    assert driver.get_log("browser") == []


def test_an_omni_page_draws_audio_spans_and_checks_itself_equal(driver, tmp_path):
    from cpinspect.core.tokens import AUDIO_PAD, IMAGE_PAD

    ids = [100, IMAGE_PAD, IMAGE_PAD, IMAGE_PAD, IMAGE_PAD, 101, AUDIO_PAD, AUDIO_PAD] + [AUDIO_PAD] * 3 + [102] * 5
    torch.save({"input_ids": torch.tensor(ids).view(1, -1), "cu_seqlens": torch.tensor([0, 8, 16]),
                "image_grid_thw": torch.tensor([[1, 4, 4]])}, tmp_path / "omni.pt")
    page = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["explore", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                      "-o", str(page)])
    assert result.exit_code == 0, result.output
    open_page(driver, page)
    assert driver.find_element("id", "cpx-check").get_attribute("data-checked") == "equal"
    audio = driver.find_elements("css selector", "#cpx-row .t.v3")
    assert sorted(int(c.get_attribute("data-g")) for c in audio) == [p for p, i in enumerate(ids) if i == AUDIO_PAD]
    assert driver.get_log("browser") == []


def test_a_whole_group_local_cp_size_page_checks_itself_equal(driver, tmp_path):
    """local_cp_size of every segment = cp is drawn as per-document zigzag (a mix is refused: tests/capability)."""
    ids = torch.full((1, 48), 100)
    ids[0, 3:9] = 151655
    torch.save({"input_ids": ids, "cu_seqlens": torch.tensor([0, 16, 48], dtype=torch.int32),
                "local_cp_size": torch.tensor(4, dtype=torch.int32)}, tmp_path / "hybrid.pt")
    page = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["explore", str(tmp_path / "hybrid.pt"), "--cp", "4", "-o", str(page)])
    assert result.exit_code == 0, result.output
    open_page(driver, page)
    assert driver.find_element("id", "cpx-check").get_attribute("data-checked") == "equal"
    assert driver.get_log("browser") == []
