"""``cpinspect layout``: draw how cp ranks split a packed row, and how evenly they share the work.

No batch is needed (``--seqlens 16,32``); with one, ``--vision`` marks its vision tokens in the
chunks and lists which encoder rows land on which rank. ``--svg``/``--html`` save the same
picture through rich's console export. Torch is imported inside the command only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from cpinspect.cli.common import guarded, import_torch, load_cli_batch, make_console, write_json
from cpinspect.cli.options import (
    EXIT_INCONSISTENT,
    EXIT_OK,
    BatchArg,
    CpOpt,
    CpPerSegmentOpt,
    DebugOpt,
    ImageIdOpt,
    JsonOpt,
    KeyOpt,
    LayoutOpt,
    MaxBytesOpt,
    ModelOpt,
    NoColorOpt,
    SequenceParallelOpt,
    TpOpt,
    VideoIdOpt,
)
from cpinspect.core.errors import InputError

if TYPE_CHECKING:
    import torch

    from cpinspect.core.batch import PackedBatch
    from cpinspect.core.tokens import TokenConfig
    from cpinspect.simulation.run import Result

SeqlensOpt = Annotated[Optional[str], typer.Option(
    "--seqlens", help="Physical segment lengths, comma-separated (e.g. 16,32): draw without a batch.")]
VisionOpt = Annotated[bool, typer.Option("--vision", help="Mark the batch's vision tokens in the chunks and show "
                                                          "which encoder rows land on which rank.")]
CompareOpt = Annotated[bool, typer.Option("--compare", help="Draw zigzag, sequence-zigzag and contiguous one after "
                                                            "the other.")]
SvgOpt = Annotated[Optional[Path], typer.Option("--svg", help="Also write the picture to this SVG file.")]
HtmlOpt = Annotated[Optional[Path], typer.Option("--html", help="Also write the picture to this HTML file.")]
FullOpt = Annotated[bool, typer.Option("--full", help="Draw every segment and list every item.")]
PadOpt = Annotated[bool, typer.Option("--pad", help="Pad segments to a multiple of 2*cp like frameworks (2*cp*tp "
                                                     "with --sequence-parallel, 2*c per segment with hybrid CP).")]


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
    tp: TpOpt = 1,
    sequence_parallel: SequenceParallelOpt = False,
    cp_per_segment: CpPerSegmentOpt = None,
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    key: KeyOpt = None,
    json_out: JsonOpt = False,
    svg: SvgOpt = None,
    html: HtmlOpt = None,
    max_bytes: MaxBytesOpt = None,
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
    from cpinspect.core.balance import balance_of, compare_layouts
    from cpinspect.core.hybrid import segment_cp_sizes, with_pad_sequences
    from cpinspect.core.layout import make_layout
    from cpinspect.core.layout_report import check_layout_size, layout_document, parse_seqlens, seqlens_cu
    from cpinspect.core.parallel import sp_document
    from cpinspect.views.layout_page import build_views, export_picture

    simulated, sp = None, tp if sequence_parallel else 1
    if seqlens is not None:
        segment_cp = segment_cp_sizes(cp, len(parse_seqlens(seqlens)), option=cp_per_segment)
        cu, source = seqlens_cu(seqlens, cp, layout, pad, sp, segment_cp)
    else:
        from cpinspect.core.tokens import token_config

        config = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id)
        simulated, cu, source, segment_cp = _from_batch(
            batch, key, cp, layout, pad=pad, vision=vision, tokens=config, max_bytes=max_bytes, tp=tp,
            sequence_parallel=sequence_parallel, cp_per_segment=cp_per_segment)
    check_layout_size(cu, cp, layout)
    drawn = simulated[0].layout if simulated is not None else make_layout(cu, cp, layout,
                                                                          with_pad_sequences(segment_cp, cu))
    balances, impossible = compare_layouts(drawn.cu_seqlens, cp)
    if drawn.kind not in balances:
        balances[drawn.kind] = balance_of(drawn)
    parallel = sp_document(drawn, tp, sequence_parallel) if tp > 1 or sequence_parallel else None
    if json_out:
        write_json(layout_document(drawn, balances, parallel=parallel), sys.stdout)
        sys.stdout.write("\n")
    ok = simulated is None or simulated[0].ok
    if json_out and svg is None and html is None:
        raise typer.Exit(EXIT_OK if ok else EXIT_INCONSISTENT)
    console = make_console(no_color)
    views = build_views(drawn, balances, impossible, source=source, width=console.width, compare=compare,
                        full=full, vision=simulated, parallel=parallel)
    if simulated is not None:
        from cpinspect.views.simulate import verdict

        views.append(verdict(simulated[0]))
    if not json_out:
        for view in views:
            console.print(view)
    for path in export_picture(views, console.width, svg, html, no_color):
        make_console(no_color, stderr=True).print(f"wrote {path}", style="dim")
    raise typer.Exit(EXIT_OK if ok else EXIT_INCONSISTENT)


def _from_batch(paths: list[Path] | None, keys: list[str] | None, cp: int, kind: str, *, pad: bool, vision: bool,
                tokens: TokenConfig, max_bytes: int | None, tp: int, sequence_parallel: bool,
                cp_per_segment: str | None
                ) -> tuple[tuple[Result, PackedBatch] | None, torch.Tensor, str, torch.Tensor | None]:
    """(the simulation and its batch when --vision, physical cu_seqlens, source name, hybrid CP sizes) of the
    batch or the demo."""
    from cpinspect.core.hybrid import segment_cp_sizes

    loaded, source = load_cli_batch(paths, keys, align=2 * cp if cp > 1 else 1, max_bytes=max_bytes)
    segment_cp = segment_cp_sizes(cp, loaded.num_segments, option=cp_per_segment, batch_value=loaded.local_cp_size)
    if vision:
        from cpinspect.simulation.run import simulate

        result = simulate(loaded, cp, kind, tokens=tokens, pad=pad, tp=tp, sequence_parallel=sequence_parallel,
                          cp_per_segment=cp_per_segment)
        return (result, loaded), result.layout.cu_seqlens, source, segment_cp
    from cpinspect.core.layout import padded_boundaries

    cu = loaded.cu_seqlens.long()
    sp = tp if sequence_parallel else 1
    return None, (padded_boundaries(cu, cp, kind, sp, segment_cp) if pad else cu), source, segment_cp
