"""``cpinspect simulate``: shard a batch over simulated CP ranks and check every rank's rows."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer

from cpinspect.cli.common import guarded, load_cli_batch, make_console, progress_steps, write_json
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
    TimeoutOpt,
    VideoIdOpt,
)
from cpinspect.core.errors import InputError


@guarded
def simulate(
    batch: BatchArg = None,
    cp: CpOpt = 2,
    layout: LayoutOpt = "zigzag",
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    key: KeyOpt = None,
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
    json_out: JsonOpt = False,
    no_color: NoColorOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Shard a packed batch over CP ranks, select each rank's vision rows, check them against an oracle."""
    from cpinspect.core.tokens import token_config

    tokens = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id)
    with progress_steps(not json_out) as step:
        step("loading batch")
        loaded, source = load_cli_batch(batch, key)
        step(f"simulating {cp} ranks")
        from cpinspect.simulation.run import simulate as run_simulation

        result = run_simulation(loaded, cp, layout, tokens=tokens, pad=pad, timeout=timeout, backend=backend)
    if rank is not None and rank >= cp:
        raise InputError(f"--rank {rank} is out of range for cp={cp}", where="--rank", fix=f"pick 0..{cp - 1}")
    extras = [ext for ext in (_positions_extension(positions, loaded), _vision_dp_extension(vision_dp, loaded))
              if ext is not None]
    ok = result.ok
    for ext in extras:
        ext.run(result)
        ok = ok and ext.ok
    if json_out:
        document = result.document()
        for ext in extras:
            ext.add_json(document)
        document["ok"] = ok
        if rank is not None:
            document["ranks"] = [document["ranks"][rank]]
        write_json(document, sys.stdout)
        sys.stdout.write("\n")
    else:
        from cpinspect.views.simulate import render_result

        console = make_console(no_color)
        render_result(result, console, source=source, rank=rank, full=full)
        for ext in extras:
            ext.render(console, rank=rank, full=full)
        if explain:
            from cpinspect.simulation.explain import render_explain

            render_explain(result, console, rank=rank or 0)
    raise typer.Exit(EXIT_OK if ok else EXIT_INCONSISTENT)


def _positions_extension(enabled: bool, batch: Any) -> Any:
    """The --positions view (cpinspect.core.mrope), or None when not asked for."""
    if not enabled:
        return None
    from cpinspect.simulation.positions import PositionsExtension

    return PositionsExtension(batch)


def _vision_dp_extension(enabled: bool, batch: Any) -> Any:
    """The --vision-dp view (cpinspect.simulation.vision_dp), or None when not asked for."""
    if not enabled:
        return None
    from cpinspect.simulation.vision_dp import VisionDPExtension

    return VisionDPExtension(batch)
