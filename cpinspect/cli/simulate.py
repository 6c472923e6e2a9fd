"""``cpinspect simulate``: shard a batch over simulated CP ranks and check every rank's rows."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from cpinspect.cli.common import guarded, load_cli_batch, make_console, progress_steps, write_json
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
    RopeOpt,
    SequenceParallelOpt,
    TimeoutOpt,
    TpOpt,
    VideoIdOpt,
)
from cpinspect.core.errors import InputError

if TYPE_CHECKING:
    from cpinspect.simulation.extension import Extension


@guarded
def simulate(
    batch: BatchArg = None,
    cp: CpOpt = 2,
    layout: LayoutOpt = "zigzag",
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    rope: RopeOpt = "mrope",
    key: KeyOpt = None,
    layout_from: Annotated[Optional[str], typer.Option(
        "--layout-from", help="A .pt/.safetensors file whose 'global_indices' entry holds each rank's global "
                              "positions (in local order) from your framework; replaces --layout.")] = None,
    tp: TpOpt = 1,
    sequence_parallel: SequenceParallelOpt = False,
    cp_per_segment: CpPerSegmentOpt = None,
    pad: Annotated[bool, typer.Option("--pad", help="Pad segments to a multiple of 2*cp like frameworks.")] = False,
    rank: Annotated[Optional[int], typer.Option("--rank", help="Show only this rank.", min=0)] = None,
    full: Annotated[bool, typer.Option("--full", help="Print long lists and tables in full.")] = False,
    timeout: TimeoutOpt = 10.0,
    backend: Annotated[str, typer.Option("--backend", help="threads (simulated group in this process) or gloo "
                                                            "(one real process per rank).")] = "threads",
    explain: Annotated[bool, typer.Option("--explain", help="Narrate one rank's selection step by step "
                                                            "(--rank picks it; default 0).")] = False,
    positions: Annotated[bool, typer.Option("--positions", help="Add per-rank 3-D mRoPE positions and check "
                                                                "the batch's position_ids.")] = False,
    vision_dp: Annotated[bool, typer.Option("--vision-dp", help="Simulate the vision-DP split and its "
                                                                "embedding all-gather.")] = False,
    scheme: Annotated[Optional[list[str]], typer.Option(
        "--scheme", help="Also run each rank's program of a selection scheme and compare: count (Megatron-Bridge), "
                         "token-ids (slime), full-row (HF/verl) or all; repeatable.")] = None,
    max_bytes: MaxBytesOpt = None,
    json_out: JsonOpt = False,
    no_color: NoColorOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Shard a packed batch over CP ranks, select each rank's vision rows, check them against an oracle."""
    from cpinspect.core.tokens import token_config

    tokens = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id, rope=rope)
    with progress_steps(not json_out) as step:
        step("loading batch")
        loaded, source = load_cli_batch(batch, key, align=2 * cp if cp > 1 else 1,
                                        max_bytes=max_bytes, notes=not json_out)
        if _valid_only(loaded, cp, source, json_out=json_out, no_color=no_color, full=full):
            raise typer.Exit(EXIT_INCONSISTENT)
        step(f"simulating {cp} ranks")
        from cpinspect.simulation.run import simulate as run_simulation

        index_map = None
        if layout_from is not None:
            from cpinspect.core.layout_maps import load_index_map

            index_map = load_index_map(layout_from, loaded.cu_seqlens)
        result = run_simulation(loaded, cp, layout, tokens=tokens, pad=pad, timeout=timeout, backend=backend,
                                index_map=index_map, tp=tp, sequence_parallel=sequence_parallel,
                                cp_per_segment=cp_per_segment)
    if rank is not None and rank >= cp:
        raise InputError(f"--rank {rank} is out of range for cp={cp}", where="--rank", fix=f"pick 0..{cp - 1}")
    extras = _extensions(positions, vision_dp, loaded)
    ok = result.ok
    runs = []
    if scheme:
        from cpinspect.simulation.schemes import parse_schemes, run_scheme

        runs = [run_scheme(result, name, timeout=timeout) for name in parse_schemes(scheme)]
        ok = ok and all(run.all_ok for run in runs)
    for ext, _ in extras:
        ext.run(result)
        ok = ok and ext.ok
    if json_out:
        document = result.document()
        for ext, _ in extras:
            ext.add_json(document)
        if runs:
            document["schemes"] = [run.to_dict(cp) for run in runs]
        document["ok"] = ok
        if rank is not None:
            document["ranks"] = [document["ranks"][rank]]
        write_json(document, sys.stdout)
        sys.stdout.write("\n")
    else:
        from cpinspect.views.simulate import render_result

        console = make_console(no_color)
        render_result(result, console, source=source, rank=rank, full=full)
        for ext, render in extras:
            render(ext, console, rank=rank, full=full)
        if runs:
            from cpinspect.views.simulate import render_schemes

            render_schemes(runs, cp, console)
        if explain:
            from cpinspect.views.explain import render_explain

            render_explain(result, console, rank=rank or 0)
    raise typer.Exit(EXIT_OK if ok else EXIT_INCONSISTENT)


def _valid_only(batch: Any, cp: int, source: str, *, json_out: bool, no_color: bool, full: bool) -> bool:
    """Report VALID_ONLY_ROW (a valid-tokens-only row under padded boundaries) instead of simulating it."""
    from cpinspect.core.valid_only import chunk_slices, is_valid_only, valid_only_finding

    if batch.per_rank_files or not is_valid_only(batch.row_tokens, batch.logical_cu_seqlens, batch.cu_seqlens):
        return False
    finding = valid_only_finding(batch.row_tokens, batch.logical_cu_seqlens, batch.cu_seqlens, cp)
    chunks = chunk_slices(batch.row_tokens, batch.cu_seqlens, cp)
    if json_out:
        write_json({"ok": False, "cp": cp, "findings": [finding.to_dict()],
                    "chunks": [vars(c) for c in chunks]}, sys.stdout)
        sys.stdout.write("\n")
    else:
        from cpinspect.views.valid_only import render_valid_only

        render_valid_only(finding, chunks, make_console(no_color), source=source, full=full)
    return True


def _extensions(positions: bool, vision_dp: bool, batch: Any) -> list[tuple[Extension, Callable[..., None]]]:
    """The extensions asked for (:class:`cpinspect.simulation.extension.Extension`), each with its view."""
    extras: list[tuple[Extension, Callable[..., None]]] = []
    if positions:
        from cpinspect.simulation.positions import PositionsExtension
        from cpinspect.views import positions as positions_view

        extras.append((PositionsExtension(batch), positions_view.render))
    if vision_dp:
        from cpinspect.simulation.vision_dp import VisionDPExtension
        from cpinspect.views import vision_dp as vision_dp_view

        extras.append((VisionDPExtension(batch), vision_dp_view.render))
    return extras
