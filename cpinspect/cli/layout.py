"""``cpinspect layout``: draw how cp ranks split a packed row, and how evenly they share the work.

No batch is needed (``--seqlens 16,32``); with one, ``--vision`` marks its vision tokens in the
chunks and lists which encoder rows land on which rank. ``--svg``/``--html`` save the same
picture through rich's console export. Torch is imported inside the command only.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console, RenderableType
from rich.text import Text

from cpinspect.cli.common import guarded, import_torch, load_cli_batch, make_console
from cpinspect.cli.options import (
    EXIT_INCONSISTENT,
    EXIT_OK,
    BatchArg,
    CpOpt,
    DebugOpt,
    ImageIdOpt,
    JsonOpt,
    KeyOpt,
    LayoutOpt,
    ModelOpt,
    NoColorOpt,
    VideoIdOpt,
)
from cpinspect.core.errors import InputError

if TYPE_CHECKING:
    import torch

    from cpinspect.core.balance import Balance
    from cpinspect.core.batch import PackedBatch
    from cpinspect.core.layout import Layout
    from cpinspect.simulation.run import Result
    from cpinspect.views.layout_vision import VisionItem

SeqlensOpt = Annotated[Optional[str], typer.Option(
    "--seqlens", help="Physical segment lengths, comma-separated (e.g. 16,32): draw without a batch.")]
VisionOpt = Annotated[bool, typer.Option("--vision", help="Mark the batch's vision tokens in the chunks and show "
                                                          "which encoder rows land on which rank.")]
CompareOpt = Annotated[bool, typer.Option("--compare", help="Draw zigzag, sequence-zigzag and contiguous one after "
                                                            "the other.")]
SvgOpt = Annotated[Optional[Path], typer.Option("--svg", help="Also write the picture to this SVG file.")]
HtmlOpt = Annotated[Optional[Path], typer.Option("--html", help="Also write the picture to this HTML file.")]
FullOpt = Annotated[bool, typer.Option("--full", help="Draw every segment and list every item.")]
PadOpt = Annotated[bool, typer.Option("--pad", help="Pad segments to a multiple of 2*cp like frameworks.")]


def parse_seqlens(text: str) -> list[int]:
    """``"16, 32"`` -> ``[16, 32]``; an exit-2 error naming the bad entry otherwise."""
    entries = [part.strip() for part in text.split(",")]
    lengths = []
    for index, entry in enumerate(entries):
        if not entry.isdigit() or int(entry) < 1:
            raise InputError(
                f"--seqlens entry {index} is {entry!r}, not a positive whole number of tokens",
                where=f"--seqlens {text}",
                fix="give the physical segment lengths as comma-separated integers, e.g. --seqlens 16,32",
            )
        lengths.append(int(entry))
    return lengths


def layout_document(layout: Layout, balances: dict[str, Balance]) -> dict[str, Any]:
    """The ``--json`` object: segments with their chunks (``end`` exclusive), ranks, balance."""
    from cpinspect.views.layout import segment_cells

    cu = layout.cu_seqlens.tolist()
    total = layout.total_tokens
    split = {"zigzag": None, "sequence-zigzag": 2 * layout.cp, "contiguous": layout.cp}[layout.kind]
    segments = []
    for index, cells in enumerate(segment_cells(layout)):
        length = cu[index + 1] - cu[index]
        chunk_len = length // (2 * layout.cp) if split is None else total // split
        segments.append({
            "segment": index, "start": cu[index], "length": length, "chunk_len": chunk_len,
            "chunks": [{"chunk": c.chunk, "rank": c.rank, "start": c.start, "end": c.end} for c in cells],
        })
    indices = layout.all_global_indices().tolist()
    return {
        "cp": layout.cp,
        "layout": layout.kind,
        "segments": segments,
        "ranks": [{"rank": rank, "global_indices": held} for rank, held in enumerate(indices)],
        "balance": {kind: balance.to_dict() for kind, balance in balances.items()},
    }


def _cu_from_seqlens(seqlens: str, cp: int, kind: str, pad: bool) -> tuple[torch.Tensor, str]:
    import torch

    lengths = parse_seqlens(seqlens)
    cu = torch.cumsum(torch.tensor([0, *lengths]), 0)
    source = f"--seqlens {seqlens}"
    if not pad:
        return cu, source
    padded = _padded(cu, cp, kind)
    if not torch.equal(padded, cu):
        source += f" (padded by --pad to {','.join(map(str, (padded[1:] - padded[:-1]).tolist()))})"
    return padded, source


def _padded(cu: torch.Tensor, cp: int, kind: str) -> torch.Tensor:
    """Boundaries padded the way ``simulate --pad`` pads: per segment for zigzag, the row's end otherwise."""
    from cpinspect.core.layout import padded_cu_seqlens

    multiple = cp if kind == "contiguous" else (2 * cp if cp > 1 else 1)
    if kind == "zigzag":
        return padded_cu_seqlens(cu, multiple)
    padded = cu.clone()
    padded[-1] = -(-int(cu[-1]) // multiple) * multiple
    return padded


def _cu_text(cu: torch.Tensor) -> str:
    values = cu.tolist()
    if len(values) <= 12:
        return str(values)
    return f"[{', '.join(map(str, values[:6]))}, …, {', '.join(map(str, values[-3:]))}] ({len(values)} entries)"


def build_views(layout: Layout, balances: dict[str, Balance], impossible: dict[str, str], *, source: str,
                width: int, compare: bool, full: bool, vision: tuple[Result, PackedBatch] | None = None
                ) -> list[RenderableType]:
    """Everything ``cpinspect layout`` prints, in order (``vision``: the simulation and its batch)."""
    from cpinspect.core.layout import LAYOUTS, make_layout
    from cpinspect.views.balance import balance_table
    from cpinspect.views.layout import layout_diagram
    from cpinspect.views.layout_vision import vision_view

    views: list[RenderableType] = [Text(f"source: {source}\ncu_seqlens {_cu_text(layout.cu_seqlens)} (physical)",
                                        style="dim")]
    mask = vision[0].full_mask if vision is not None else None
    items = _items(*vision) if vision is not None else []
    kinds = LAYOUTS if compare else (layout.kind,)
    for kind in kinds:
        if kind in impossible:
            views.append(Text(f"{kind} layout: cannot cut this row: {impossible[kind]}", style="yellow"))
            continue
        drawn = layout if kind == layout.kind else make_layout(layout.cu_seqlens, layout.cp, kind)
        views += [layout_diagram(drawn, width, mask=mask, full=full), Text("")]
        if vision is not None:
            views += [vision_view(drawn, vision[0].full_mask, items, full), Text("")]
    views.append(balance_table(balances, impossible, layout.kind))
    return views


def _items(result: Result, batch: PackedBatch) -> list[VisionItem]:
    from cpinspect.views.layout_vision import vision_items

    return vision_items(result.full_ids, result.full_mask, result.layout.cu_seqlens,
                        image_token_id=result.tokens.image_token_id, video_token_id=result.tokens.video_token_id,
                        image_grid=batch.image_grid_thw, video_grid=batch.video_grid_thw,
                        merge_area=result.tokens.merge_area)


def export_picture(views: list[RenderableType], width: int, svg: Path | None, html: Path | None,
                   no_color: bool) -> list[Path]:
    """Write the same views to SVG and/or HTML through a recording console (colour unless --no-color)."""
    if svg is None and html is None:
        return []
    recorder = Console(record=True, width=width, file=io.StringIO(), highlight=False,
                       color_system=None if no_color else "truecolor", force_terminal=not no_color)
    for view in views:
        recorder.print(view)
    written = []
    for path, export in ((svg, recorder.export_svg), (html, recorder.export_html)):
        if path is None:
            continue
        text = recorder.export_svg(title="cpinspect layout", clear=False) if path is svg else export(clear=False)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise InputError(f"could not write {path} ({exc.strerror or exc})", where=str(path),
                             fix="pick a writable path") from None
        written.append(path)
    return written


@guarded
def layout(
    batch: BatchArg = None,
    cp: CpOpt = 2,
    seqlens: SeqlensOpt = None,
    layout: LayoutOpt = "zigzag",
    vision: VisionOpt = False,
    compare: CompareOpt = False,
    full: FullOpt = False,
    pad: PadOpt = False,
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    key: KeyOpt = None,
    json_out: JsonOpt = False,
    svg: SvgOpt = None,
    html: HtmlOpt = None,
    no_color: NoColorOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Draw how CP ranks split a packed row (chunks, local rows, load balance); no batch needed."""
    if seqlens is not None and batch:
        raise InputError("both --seqlens and a batch were given", where="--seqlens",
                         fix="pass either segment lengths or a batch file, not both")
    if vision and seqlens is not None:
        raise InputError("--vision needs a batch, but only --seqlens was given", where="--vision",
                         fix="pass a batch file (e.g. examples/qwen3vl_packed.pt) or drop --vision")
    for target in (svg, html):
        if target is not None and not target.parent.is_dir():
            raise InputError(f"cannot write {target}: the folder {target.parent} does not exist", where=str(target),
                             fix="create the folder first or pick another path")
    import_torch()
    from cpinspect.core.balance import compare_layouts
    from cpinspect.core.layout import make_layout

    simulated = None
    if seqlens is not None:
        cu, source = _cu_from_seqlens(seqlens, cp, layout, pad)
    else:
        simulated, cu, source = _from_batch(batch, key, cp, layout, pad, vision, model, image_token_id,
                                            video_token_id)
    drawn = simulated[0].layout if simulated is not None else make_layout(cu, cp, layout)
    balances, impossible = compare_layouts(drawn.cu_seqlens, cp)
    if json_out:
        sys.stdout.write(json.dumps(layout_document(drawn, balances)) + "\n")
    ok = simulated is None or simulated[0].ok
    if json_out and svg is None and html is None:
        raise typer.Exit(EXIT_OK if ok else EXIT_INCONSISTENT)
    console = make_console(no_color)
    views = build_views(drawn, balances, impossible, source=source, width=console.width, compare=compare,
                        full=full, vision=simulated)
    if simulated is not None:
        from cpinspect.views.simulate import verdict

        views.append(verdict(simulated[0]))
    if not json_out:
        for view in views:
            console.print(view)
    for path in export_picture(views, console.width, svg, html, no_color):
        make_console(no_color, stderr=True).print(f"wrote {path}", style="dim")
    raise typer.Exit(EXIT_OK if ok else EXIT_INCONSISTENT)


def _from_batch(paths: list[Path] | None, keys: list[str] | None, cp: int, kind: str, pad: bool, vision: bool,
                model: str, image_token_id: int | None, video_token_id: int | None
                ) -> tuple[tuple[Result, PackedBatch] | None, torch.Tensor, str]:
    """(the simulation and its batch when --vision, physical cu_seqlens, source name) of the batch or the demo."""
    from cpinspect.core.tokens import token_config

    tokens = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id)
    loaded, source = load_cli_batch(paths, keys)
    if vision:
        from cpinspect.simulation.run import simulate

        result = simulate(loaded, cp, kind, tokens=tokens, pad=pad)
        return (result, loaded), result.layout.cu_seqlens, source
    cu = loaded.cu_seqlens.long()
    return None, (_padded(cu, cp, kind) if pad else cu), source
