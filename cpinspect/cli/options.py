"""The options every command shares, as typed annotations, and the exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

EXIT_OK, EXIT_INCONSISTENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: stdout's reader closed it (``| head``)

# Stated limits (README "Reliability"): beyond them an option is a usage error (exit 2), never an overflow.
MAX_CP = 1 << 20  # 1,048,576 ranks
MAX_TOKEN_ID = (1 << 63) - 1  # token ids are compared inside int64 tensors

BatchArg = Annotated[
    Optional[list[Path]],
    typer.Argument(help="Batch file (.pt/.safetensors), a directory of rank{r} files, or one file per rank "
                        "in rank order. Omit to use the built-in demo batch.", show_default=False),
]
CpOpt = Annotated[int, typer.Option("--cp", help="Context-parallel size (number of simulated ranks).", min=1,
                                    max=MAX_CP)]
LayoutOpt = Annotated[str, typer.Option("--layout", help="zigzag (Megatron per-document THD), sequence-zigzag "
                                                          "(whole row as one sequence), contiguous, head-tail or "
                                                          "per-document-head-tail (PyTorch's balancers); hybrid CP "
                                                          "comes from --cp-per-segment or local_cp_size.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Token preset: qwen2-vl, qwen2.5-vl, qwen3-vl, "
                                                        "qwen2.5-omni or qwen3-omni (audio placeholders too).")]
ImageIdOpt = Annotated[Optional[int], typer.Option("--image-token-id", help="Override the image_pad token id.",
                                                   min=0, max=MAX_TOKEN_ID)]
VideoIdOpt = Annotated[Optional[int], typer.Option("--video-token-id", help="Override the video_pad token id.",
                                                   min=0, max=MAX_TOKEN_ID)]
RopeOpt = Annotated[str, typer.Option("--rope", help="How the model's position_ids are checked: mrope (3-D "
                                                   "(t, h, w), the Qwen-VL presets) or 1d (plain 1-D RoPE: each "
                                                   "token's offset in its segment).")]
KeyOpt = Annotated[Optional[list[str]], typer.Option("--key", help="Map a field to your key name: "
                                                                    "--key input_ids=tokens_local (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object (complete lists).")]
NoColorOpt = Annotated[bool, typer.Option("--no-color", help="No colours (NO_COLOR is honoured too).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the Python traceback of errors.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds each simulated collective may wait.")]
MaxBytesOpt = Annotated[Optional[int], typer.Option("--max-bytes", help="Refuse a batch file declaring more bytes "
                                                    "than this (default: half the available memory).", min=1)]
TpOpt = Annotated[int, typer.Option("--tp", help="Tensor-parallel size (with --sequence-parallel: the sequence is "
                                                 "also split over tp after the CP split).", min=1, max=MAX_CP)]
SequenceParallelOpt = Annotated[bool, typer.Option("--sequence-parallel", help="Megatron sequence parallelism: "
                                                   "--pad aligns segments to 2*cp*tp.")]
CpPerSegmentOpt = Annotated[Optional[str], typer.Option(
    "--cp-per-segment", help="Hybrid / dynamic CP (Megatron-LM): one local CP size per segment, each dividing --cp "
                             "(e.g. 2,2,4); the batch's local_cp_size field does the same.", show_default=False)]
RunTpOpt = Annotated[Optional[int], typer.Option(
    "--tp", help="The failing run's tensor-parallel size: size-mismatch hypotheses keep only this tp (default: "
                 "read it from the error's numbers).", min=1, max=MAX_CP, show_default=False)]
RunSequenceParallelOpt = Annotated[Optional[bool], typer.Option(
    "--sequence-parallel/--no-sequence-parallel", help="Whether the failing run had sequence parallelism "
    "(default: unknown, assumed where the numbers need it).", show_default=False)]
