"""``cpinspect diagnose``: explain a CP + vision error from the batch and the error text.

Torch is imported inside the command only (``--help`` imports every command module).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cpinspect.cli.common import guarded, import_torch, make_console, parse_keys, progress_steps
from cpinspect.cli.options import (
    DebugOpt,
    ImageIdOpt,
    JsonOpt,
    KeyOpt,
    LayoutOpt,
    MaxBytesOpt,
    ModelOpt,
    NoColorOpt,
    RopeOpt,
    RunSequenceParallelOpt,
    RunTpOpt,
    TimeoutOpt,
    VideoIdOpt,
)
from cpinspect.core.errors import InputError

BatchFilesArg = Annotated[list[Path], typer.Argument(
    help="Batch file (.pt/.safetensors; full row or one rank's row), a directory of rank{r} files, or one file per "
         "rank in rank order.", show_default=False)]
DiagnoseCpOpt = Annotated[Optional[int], typer.Option(
    "--cp", help="Context-parallel size of the failing run (default: the number of rank files, or the cp a "
                 "pre-sharded row was cut for).", show_default=False)]
ErrorOpt = Annotated[Optional[str], typer.Option(
    "--error", help="The error message (or pasted log lines) to explain.", show_default=False)]
ErrorFileOpt = Annotated[Optional[Path], typer.Option(
    "--error-file", help="A training log; the last recognised error line is explained.", show_default=False)]
EmbedsOpt = Annotated[Optional[int], typer.Option(
    "--embeds", help="Rows the vision encoder produced (vision_embeds.shape[0]), if known.", show_default=False)]
RankOpt = Annotated[Optional[int], typer.Option(
    "--rank", help="The rank that raised (default: the log's \\[rankN]: prefix).", show_default=False)]


@guarded
def diagnose(
    batch: BatchFilesArg,
    cp: DiagnoseCpOpt = None,
    layout: LayoutOpt = "zigzag",
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    rope: RopeOpt = "mrope",
    key: KeyOpt = None,
    max_bytes: MaxBytesOpt = None,
    error: ErrorOpt = None,
    error_file: ErrorFileOpt = None,
    embeds: EmbedsOpt = None,
    rank: RankOpt = None,
    tp: RunTpOpt = None,
    sequence_parallel: RunSequenceParallelOpt = None,
    timeout: TimeoutOpt = 10.0,
    json_out: JsonOpt = False,
    no_color: NoColorOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Explain a mismatched scatter or count error from the batch and the error text (or audit the batch)."""
    from cpinspect.core.tokens import token_config
    from cpinspect.diagnose.errortext import read_error_log

    if error is not None and error_file is not None:
        raise InputError("both --error and --error-file were given", where="--error / --error-file",
                         fix="give the message inline with --error, or the log with --error-file, not both")
    tokens = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id, rope=rope)
    observed: Any = error
    if error_file is not None:
        observed = read_error_log(error_file)
    with progress_steps(not json_out) as step:
        step("loading batch")
        import_torch()
        from cpinspect.core.loading import load_batch
        from cpinspect.diagnose import diagnose_batch

        loaded = load_batch(batch[0] if len(batch) == 1 else list(batch), keys=parse_keys(key), stacked="concatenate",
                           align=2 * cp if cp is not None and cp > 1 else 1, max_bytes=max_bytes)
        step("simulating hypotheses")
        report = diagnose_batch(loaded, cp if cp is not None else _infer_cp(loaded), layout=layout, tokens=tokens,
                                error_text=observed, embeds=embeds, rank=rank, timeout=timeout, tp=tp,
                                sequence_parallel=sequence_parallel)
    if error_file is not None and observed is None:
        from cpinspect.core.findings import Finding

        report.findings.insert(0, Finding(
            "ERROR_NOT_RECOGNISED", "info", status="info", message=
            f"no line of {error_file} matched a known error form, so the batch was audited only",
            hint="pass the line with the numbers via --error (the README lists the forms)"))
    if json_out:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    else:
        from cpinspect.views.diagnose import render_report

        render_report(report, make_console(no_color))
    raise typer.Exit(report.exit_code)


def _infer_cp(batch: Any) -> int:
    """The cp the rows were cut for, when the batch says it (rank files, a pre-sharded row)."""
    cut = batch.cut_for()
    if cut is not None:
        return int(cut)
    raise InputError(
        f"--cp is needed: the batch is a full row of {batch.row_tokens} tokens, so it does not say which cp the run "
        "used", where="--cp", fix="pass the run's context-parallel size, e.g. --cp 2")
