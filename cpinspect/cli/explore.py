"""``cpinspect explore``: write one self-contained HTML page to play with the layout in a browser.

The page recomputes the layout, counts, rows and work in the browser for any cp, layout and
segment lengths; it embeds the CLI's own ``simulate --json`` / ``layout --json`` numbers for the
setting it was built with and checks itself against them on load. Torch is imported inside the
command only.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cpinspect.cli.common import guarded, import_torch, load_cli_batch, make_console
from cpinspect.cli.layout import PadOpt, SeqlensOpt
from cpinspect.cli.options import (
    EXIT_OK,
    BatchArg,
    CpOpt,
    DebugOpt,
    ImageIdOpt,
    KeyOpt,
    LayoutOpt,
    MaxBytesOpt,
    ModelOpt,
    NoColorOpt,
    VideoIdOpt,
)
from cpinspect.core.errors import InputError

if TYPE_CHECKING:
    from cpinspect.core.batch import PackedBatch

OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")]
FromOpt = Annotated[int, typer.Option("--from", min=0, help="For a row too long to draw cell by cell: the first "
                                                           "token of the range drawn in full.")]


def _seqlens_batch(lengths: list[int]) -> PackedBatch:
    """A text-only batch with these physical segment lengths (no vision tokens)."""
    import torch

    from cpinspect.core.loading import load_batch
    from cpinspect.core.synth import TEXT_LOW

    cu = torch.cumsum(torch.tensor([0, *lengths]), 0).to(torch.int32)
    batch = load_batch({"input_ids": torch.full((1, int(cu[-1])), TEXT_LOW), "cu_seqlens": cu})
    return batch


def _without_uniform_hybrid(loaded: PackedBatch, cp: int, kind: str) -> PackedBatch:
    """The batch as the page can draw it: a ``local_cp_size`` of ``cp`` for every segment is per-document
    zigzag over all ranks, so it is dropped; any other hybrid mix is refused (the page models the named
    layouts only, and would draw another layout than ``simulate`` runs)."""
    if loaded.local_cp_size is None:
        return loaded
    import dataclasses

    from cpinspect.core.hybrid import segment_cp_sizes

    sizes = segment_cp_sizes(cp, loaded.num_segments, batch_value=loaded.local_cp_size)
    whole_group = sizes is None or bool((sizes == cp).all())
    if whole_group and kind == "zigzag":
        return dataclasses.replace(loaded, local_cp_size=None)
    if whole_group:
        raise InputError(
            f"the batch's local_cp_size puts every segment on all {cp} ranks, which is per-document zigzag, but "
            f"--layout {kind} was asked", where="local_cp_size",
            fix="drop --layout (zigzag is what the batch says), or save the batch without local_cp_size")
    mix = sorted({int(c) for c in sizes.tolist()}) if sizes is not None else []
    raise InputError(
        f"the batch carries a local_cp_size (hybrid CP, local sizes {', '.join(map(str, mix))} of --cp {cp}), which "
        f"the explorer does not draw: its page models the named layouts over all {cp} ranks only",
        where="local_cp_size",
        fix=f"see the hybrid layout with `cpinspect simulate BATCH --cp {cp}` or `cpinspect layout BATCH --cp {cp}`; "
            "to explore the plain layout, save the batch without local_cp_size")


def _command_lines(batch_words: list[str], cp: int, kind: str, pad: bool) -> list[str]:
    tail = [f"--cp {cp}", *([f"--layout {kind}"] if kind != "zigzag" else []), *(["--pad"] if pad else []), "--json"]
    return [" ".join(["cpinspect", name, *batch_words, *tail]) for name in ("simulate", "layout")]


@guarded
def explore(
    batch: BatchArg = None,
    cp: CpOpt = 2,
    seqlens: SeqlensOpt = None,
    layout: LayoutOpt = "zigzag",
    pad: PadOpt = False,
    output: OutputOpt = Path("explorer.html"),
    start: FromOpt = 0,
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    key: KeyOpt = None,
    max_bytes: MaxBytesOpt = None,
    no_color: NoColorOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write one self-contained HTML page to explore the layout interactively (no network needed)."""
    if seqlens is not None and batch:
        raise InputError("both --seqlens and a batch were given", where="--seqlens",
                         fix="pass either segment lengths or a batch file, not both")
    if not output.parent.is_dir():
        raise InputError(f"cannot write {output}: the folder {output.parent} does not exist", where=str(output),
                         fix="create the folder first or pick another path")
    if cp > 16:
        raise InputError(f"--cp {cp} is more than the explorer draws (16 ranks)", where="--cp", fix="pick 1..16")
    from cpinspect.core.tokens import token_config

    tokens = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id)
    suffix = ""
    if seqlens is not None:
        import_torch()
        from cpinspect.core.layout_report import parse_seqlens

        loaded, source, words = _seqlens_batch(parse_seqlens(seqlens)), f"--seqlens {seqlens}", [f"--seqlens {seqlens}"]
    else:
        loaded, source = load_cli_batch(batch, key, max_bytes=max_bytes)
        words = [shlex.quote(str(p)) for p in batch or []]
        plain = _without_uniform_hybrid(loaded, cp, layout)
        if plain is not loaded:  # the page is checked against the batch read as zigzag, not its hybrid form
            suffix = f" on the batch without its local_cp_size (every segment on all {cp} ranks: zigzag)"
        loaded = plain
    commands = [line + suffix for line in _command_lines(words, cp, layout, pad)]
    page = build(loaded, cp, layout, pad, tokens, source=source, commands=commands, start=start)
    try:
        output.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"could not write {output} ({exc.strerror or exc})", where=str(output),
                         fix="pick a writable path") from None
    make_console(no_color, stderr=True).print(f"wrote {output} ({len(page.encode()) / 1024:,.0f} KB)", style="dim")
    raise typer.Exit(EXIT_OK)


def build(loaded: Any, cp: int, kind: str, pad: bool, tokens: Any, *, source: str, commands: list[str],
          start: int = 0) -> str:
    """The page's HTML for ``loaded`` at ``cp``/``kind``: simulate, take the CLI's JSON, render."""
    from cpinspect.core.balance import compare_layouts
    from cpinspect.core.layout_report import layout_document
    from cpinspect.explore import page_data, render_page
    from cpinspect.simulation.explain import naive_scatter_message
    from cpinspect.simulation.run import simulate
    from cpinspect.views.simulate import RANK_COLORS, RANK_LETTERS, contrast_text

    result = simulate(loaded, cp, kind, tokens=tokens, pad=pad)
    balances, _ = compare_layouts(result.layout.cu_seqlens, cp)
    cu = loaded.cu_seqlens.long()
    data = page_data(
        result, seqlens=(cu[1:] - cu[:-1]).tolist(), pad=pad, layout_json=layout_document(result.layout, balances),
        naive=[naive_scatter_message(r.local_mask, result.vision_embed_count) for r in result.ranks],
        commands=commands, palette=[(c, contrast_text(c)) for c in RANK_COLORS], letters=RANK_LETTERS, start=start,
    )
    return render_page(data, title=f"cp {cp}, {kind}", source=f"source: {source}")
