"""Everything ``cpinspect layout`` prints, in order, and the same picture exported to SVG/HTML.

``python -m cpinspect.views.layout_page`` draws the page for ``--seqlens 16,32 --cp 2``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from rich.console import Console, RenderableType
from rich.text import Text

from cpinspect.core.balance import Balance
from cpinspect.core.batch import PackedBatch
from cpinspect.core.errors import InputError
from cpinspect.core.layout import Layout, compared_layouts, make_layout
from cpinspect.core.vision_items import VisionItem, row_items
from cpinspect.simulation.run import Result
from cpinspect.views.balance import balance_table
from cpinspect.views.layout import layout_diagram
from cpinspect.views.layout_parallel import parallel_view
from cpinspect.views.layout_vision import vision_view


def _cu_text(cu: torch.Tensor) -> str:
    values = cu.tolist()
    if len(values) <= 12:
        return str(values)
    return f"[{', '.join(map(str, values[:6]))}, …, {', '.join(map(str, values[-3:]))}] ({len(values)} entries)"


def build_views(layout: Layout, balances: dict[str, Balance], impossible: dict[str, str], *, source: str,
                width: int, compare: bool, full: bool, vision: tuple[Result, PackedBatch] | None = None,
                parallel: dict[str, Any] | None = None) -> list[RenderableType]:
    """Everything ``cpinspect layout`` prints, in order (``vision``: the simulation and its batch; ``parallel``:
    :func:`cpinspect.core.parallel.sp_document` with ``--tp``)."""
    views: list[RenderableType] = [Text(f"source: {source}\ncu_seqlens {_cu_text(layout.cu_seqlens)} (physical)",
                                        style="dim")]
    mask = vision[0].full_mask if vision is not None else None
    items = _items(*vision) if vision is not None else []
    kinds = compared_layouts(layout.kind) if compare else (layout.kind,)
    for kind in kinds:
        if kind in impossible:
            views.append(Text(f"{kind} layout: cannot cut this row: {impossible[kind]}", style="yellow"))
            continue
        drawn = layout if kind == layout.kind else make_layout(layout.cu_seqlens, layout.cp, kind)
        views += [layout_diagram(drawn, width, mask=mask, full=full), Text("")]
        if vision is not None:
            views += [vision_view(drawn, vision[0].full_mask, items, full), Text("")]
        if parallel is not None and kind == layout.kind:
            views += [parallel_view(parallel, layout.cp, full), Text("")]
    shown = compared_layouts(layout.kind)
    views.append(balance_table({k: b for k, b in balances.items() if k in shown},
                               {k: r for k, r in impossible.items() if k in shown}, layout.kind, full))
    return views


def _items(result: Result, batch: PackedBatch) -> list[VisionItem]:
    return row_items(result.full_ids, result.full_mask, result.layout.cu_seqlens,
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


if __name__ == "__main__":
    from cpinspect.core.balance import compare_layouts

    demo = make_layout(torch.tensor([0, 16, 48]), 2)
    console = Console()
    balances, impossible = compare_layouts(demo.cu_seqlens, 2)
    for part in build_views(demo, balances, impossible, source="--seqlens 16,32", width=console.width,
                            compare=False, full=False):
        console.print(part)
