"""``cpinspect check``: run your own selection function on simulated CP ranks against the oracle.

Torch is imported inside the command only (``--help`` must stay torch-free).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from cpinspect.check.signatures import SIGNATURES
from cpinspect.cli.common import guarded, import_torch, make_console, parse_keys, progress_steps
from cpinspect.cli.options import (
    EXIT_INCONSISTENT,
    EXIT_OK,
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
    from cpinspect.check.reference import Reference

TargetArg = Annotated[str, typer.Argument(
    metavar="IMPLEMENTATION",
    help="Your function: path/to/file.py:function or package.module:function.", show_default=False)]
CpListOpt = Annotated[str, typer.Option("--cp", help="Comma-separated cp values to generate cases for.")]
SignatureOpt = Annotated[Optional[str], typer.Option(
    "--signature", help=f"How your function is called: {', '.join(SIGNATURES)} (see the README); omitted: "
                        "inferred from the function's parameter names.", show_default=False)]
DEFAULT_OUT = Path("cpinspect-failures")  # in .gitignore
ReferenceOpt = Annotated[Optional[str], typer.Option(
    "--reference", metavar="REF", help="Judge a fn(group, **batch) program by its per-token output: REF "
    "(file.py:function) is ref(**batch) on the unsharded row -> [T, ...]; each rank must return REF's output at "
    "its tokens' global positions.", show_default=False)]
BatchesOpt = Annotated[Optional[list[Path]], typer.Option(
    "--batch", help="A batch file or rank directory to check as well (repeatable).", show_default=False)]


def parse_cps(text: str) -> list[int]:
    """``"2,3,4,8"`` -> ``[2, 3, 4, 8]``; an exit-2 error for anything else."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise InputError(f"--cp {text!r} is not a list of positive integers", where="--cp",
                         fix="write e.g. --cp 2,3,4,8")
    return list(dict.fromkeys(values))


def token_flags(model: str, image_token_id: int | None, video_token_id: int | None) -> list[str]:
    """The token options to repeat in replay commands (only those that differ from the defaults)."""
    flags = ["--model", model] if model != "qwen3-vl" else []
    flags += ["--image-token-id", str(image_token_id)] if image_token_id is not None else []
    return flags + (["--video-token-id", str(video_token_id)] if video_token_id is not None else [])


def import_notice(target: str) -> str:
    """The one stderr line said before the user's code is imported: importing runs its top level."""
    module_part = target.rpartition(":")[0] or target
    if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
        where = module_part
    else:
        where = f"module {module_part}"
        if "." not in module_part:  # find_spec of a dotted name would import (run) its parents
            import importlib.util

            with contextlib.suppress(Exception):
                spec = importlib.util.find_spec(module_part)
                if spec is not None and spec.origin:
                    where += f" ({spec.origin})"
    return f"note: importing {where} runs its top-level code, as Python's import does (check only code you trust)"


@guarded
def check(
    target: TargetArg,
    cp: CpListOpt = "2,3,4,8",
    signature: SignatureOpt = None,
    layout: LayoutOpt = "zigzag",
    batch: BatchesOpt = None,
    reference: ReferenceOpt = None,
    rtol: Annotated[float, typer.Option("--rtol", help="With --reference: relative tolerance for float outputs.")
                    ] = 1e-4,  # reference.DEFAULT_RTOL (not imported: --help stays torch-free)
    atol: Annotated[float, typer.Option("--atol", help="With --reference: absolute tolerance for float outputs.")
                    ] = 1e-5,
    cases: Annotated[int, typer.Option("--cases", help="Generated cases (spread over the cp values).", min=0)] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated cases.")] = 0,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds a simulated collective may wait before the "
                                                             "ranks are reported as hung.")] = 5.0,
    max_time: Annotated[float, typer.Option("--max-time", help="Stop starting new cases after this many seconds.")
                        ] = 120.0,
    out: Annotated[Path, typer.Option("--out", help="Folder for shrunk failing batches.")] = DEFAULT_OUT,
    no_shrink: Annotated[bool, typer.Option("--no-shrink", help="Report failures without shrinking them.")] = False,
    allow_apply_keywords: Annotated[bool, typer.Option(
        "--allow-apply-keywords", help="Accept autograd Function.apply(..., kw=...) (only new torch does).")] = False,
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    key: KeyOpt = None,
    json_out: JsonOpt = False,
    no_color: NoColorOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run YOUR selection function on simulated CP ranks; compare every rank with the oracle (--reference: any CP
    program, against your reference)."""
    cps = parse_cps(cp)
    if cases == 0 and not batch:
        raise InputError("nothing to check: --cases 0 and no --batch", where="--cases",
                         fix="generate cases (--cases 100) or pass --batch FILE")
    import_torch()
    from cpinspect.check import load_function, run_check
    from cpinspect.check.signatures import get_signature
    from cpinspect.check.suite import check_layout_name
    from cpinspect.core.layout import pad_multiple
    from cpinspect.core.loading import load_batch
    from cpinspect.core.tokens import token_config
    from cpinspect.views.check import render_report

    if signature is not None:
        get_signature(signature)
    check_layout_name(layout)
    tokens = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id)
    keys = parse_keys(key)
    # a padded [B, T] batch is packed once, every segment aligned for every requested cp (zigzag: 2*cp each)
    align = math.lcm(*(pad_multiple(c, layout) for c in cps))
    batches = [load_batch(path, keys=keys, align=align) for path in batch or []]
    make_console(no_color, stderr=True).print(import_notice(target), style="dim", markup=False, highlight=False)
    fn = load_function(target)
    ref = _load_reference(reference, target, rtol, atol, no_color) if reference is not None else None
    if signature is not None and ref is None:
        from cpinspect.check.signatures import check_fits

        check_fits(fn, get_signature(signature))  # exit 2 before any case runs
    with progress_steps(not json_out) as step:
        step(f"checking {target} on cp {', '.join(map(str, cps))}{'' if layout == 'zigzag' else f', {layout} layout'}")
        report = run_check(
            fn, cp=cps, cases=cases, seed=seed, signature=signature, batches=batches, timeout=timeout,
            max_seconds=max_time, shrink=not no_shrink, save_dir=out, target=target, tokens=tokens,
            strict_apply=not allow_apply_keywords, replay_flags=token_flags(model, image_token_id, video_token_id),
            check_flags=(["--out", str(out)] if out != DEFAULT_OUT else [])  # the replay saves where this run did
            + (_reference_flags(ref) if ref is not None else []), reference=ref, layout=layout,
        )
    if json_out:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    else:
        render_report(report.lines(), make_console(no_color))
    raise typer.Exit(EXIT_OK if report.ok else EXIT_INCONSISTENT)


def _load_reference(target: str, program: str, rtol: float, atol: float, no_color: bool) -> Reference:
    """The ``--reference`` function and tolerances (exit 2 for a negative tolerance; run_check checks the rest)."""
    from cpinspect.check import load_function
    from cpinspect.check.reference import Reference

    if rtol < 0 or atol < 0:
        raise InputError(f"--rtol {rtol:g} / --atol {atol:g}: a tolerance is negative", where="--rtol/--atol",
                         fix="pass 0 or more (0 and 0: exact equality)")
    if target.rpartition(":")[0] != program.rpartition(":")[0]:  # the program's file was announced already
        make_console(no_color, stderr=True).print(import_notice(target), style="dim", markup=False, highlight=False)
    return Reference(load_function(target), target, rtol, atol)


def _reference_flags(ref: Reference) -> list[str]:
    """What a replay command repeats so that it judges against the same reference."""
    from cpinspect.check.reference import DEFAULT_ATOL, DEFAULT_RTOL

    flags = ["--reference", ref.name]
    flags += ["--rtol", f"{ref.rtol:g}"] if ref.rtol != DEFAULT_RTOL else []
    return flags + (["--atol", f"{ref.atol:g}"] if ref.atol != DEFAULT_ATOL else [])
