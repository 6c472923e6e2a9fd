"""``cpinspect info``: what a batch file holds and how cpinspect reads it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cpinspect.cli.common import guarded, load_cli_batch, make_console
from cpinspect.cli.options import (
    DebugOpt,
    ImageIdOpt,
    JsonOpt,
    KeyOpt,
    MaxBytesOpt,
    ModelOpt,
    NoColorOpt,
    VideoIdOpt,
)


@guarded
def info(
    batch: Annotated[list[Path], typer.Argument(help="Batch file, rank directory, or per-rank files.")],
    cp: Annotated[Optional[int], typer.Option("--cp", help="Say whether the batch is full or pre-sharded for this cp.",
                                              min=1)] = None,
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    key: KeyOpt = None,
    max_bytes: MaxBytesOpt = None,
    json_out: JsonOpt = False,
    no_color: NoColorOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print what a batch file holds: keys, shapes, dtypes, segments, vision tokens, full or pre-sharded."""
    from cpinspect.core.tokens import token_config

    tokens = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id)
    loaded, source = load_cli_batch(batch, key, align=2 * cp if cp and cp > 1 else 1, max_bytes=max_bytes,
                                    notes=False)
    from cpinspect.core.summary import describe_batch
    from cpinspect.views.info import render_info

    summary = describe_batch(loaded, tokens, cp=cp)
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        render_info(summary, make_console(no_color), source=source)
