"""Regenerate ``docs/zigzag.md`` and ``docs/zigzag-cp4.svg`` from the tool's real output.

Run from anywhere: ``python docs/make_tutorial.py`` rewrites both files; ``--check`` only says
whether they are current (exit 1 if not). Every console block of the tutorial is a
``$ cpinspect ...`` line followed by exactly what that command prints at a fixed width without
colour, and the few numbers quoted in the prose are computed with cpinspect's own API, so
nothing in the tutorial is typed by hand. ``tests/capability/test_transcripts.py`` re-runs every block.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "zigzag.md"
PICTURE = ROOT / "docs" / "zigzag-cp4.svg"
PICTURE_COMMAND = "cpinspect layout --cp 4 --seqlens 16,32"
WIDTH = 100
ENV = {"COLUMNS": str(WIDTH), "LINES": "50", "NO_COLOR": "1", "TERM": "dumb"}


@dataclass(frozen=True)
class Command:
    """A console block: the command line as a user types it."""

    line: str


def run_cli(line: str) -> tuple[int, str]:
    """Exit code and combined stdout/stderr of ``cpinspect ...``, in process, at the tutorial's width."""
    from typer.testing import CliRunner

    from cpinspect.cli.app import app

    words = shlex.split(line)
    assert words[0] == "cpinspect", line
    result = CliRunner().invoke(app, words[1:], env=ENV)
    return result.exit_code, result.output


def console_block(line: str) -> str:
    """The markdown for one command: its line, its output (trailing spaces dropped), its exit code if not 0."""
    code, output = run_cli(line)
    shown = [f"$ {line}", *(text.rstrip() for text in output.rstrip("\n").split("\n"))]
    if code:
        shown.append(f"[exit code {code}]")
    return "```console\n" + "\n".join(shown) + "\n```"


def _numbers() -> dict[str, str]:
    """The figures the prose quotes, computed by the library rather than typed."""
    import torch

    from cpinspect.core.balance import compare_layouts

    small, _ = compare_layouts(torch.tensor([0, 16]), 2)
    four, _ = compare_layouts(torch.tensor([0, 32]), 4)
    packed, _ = compare_layouts(torch.tensor([0, 8, 24]), 2)
    contiguous, zigzag = small["contiguous"], small["zigzag"]
    return {
        "c0": f"{int(contiguous.work[0])}", "c1": f"{int(contiguous.work[1])}",
        "p0": f"{contiguous.percent[0]:.1f}%", "p1": f"{contiguous.percent[1]:.1f}%",
        "z0": f"{int(zigzag.work[0])}", "total": f"{contiguous.total}",
        "cmax": f"{contiguous.imbalance:.2f}", "four": f"{four['contiguous'].imbalance:.2f}",
        "four_last": f"{four['contiguous'].percent[-1]:.1f}%", "seq": f"{packed['sequence-zigzag'].imbalance:.2f}",
    }


def sections(n: dict[str, str]) -> list[str | Command]:
    """The tutorial, in order: prose paragraphs and the commands whose real output follows them."""
    return [
        "# Learning the zigzag layout with cpinspect",
        "This walk-through goes from *why a contiguous split is unbalanced* to *why pre-sharded vision rows "
        "need a count all-gather*. Every block below is a real `cpinspect` command followed by its real output "
        f"({WIDTH} columns, no colour); `python docs/make_tutorial.py` regenerates this file and "
        "`tests/capability/test_transcripts.py` re-runs every block, so what you read is what the tool prints. "
        "Run the same commands in a terminal to see each rank in its own colour.",
        "## 1. Why a contiguous split is unbalanced",
        "Causal attention lets the query at offset *k* of a sequence see *k + 1* keys: itself and everything "
        "before it. Cut a 16-token sequence into two contiguous halves and the second rank's queries see far "
        "more keys than the first's:",
        Command("cpinspect layout --cp 2 --seqlens 16 --layout contiguous"),
        f"Rank 0 computes {n['c0']} query-key pairs ({n['p0']} of {n['total']}), rank 1 computes {n['c1']} "
        f"({n['p1']}): the **last** rank does the most work, and every step waits for it ({n['cmax']}x the "
        "balanced time). Some guides state this backwards; the count above settles it. It gets worse with more "
        f"ranks: for 32 tokens over 4 ranks the last rank does {n['four_last']} of the work ({n['four']}x).",
        "## 2. Zigzag: chunk r and its mirror 2·cp−1−r",
        "Megatron cuts every sequence into `2*cp` equal chunks and gives rank `r` chunk `r` **and** chunk "
        "`2*cp-1-r`: one cheap early chunk and one expensive late chunk. The two chunks' start offsets add up to "
        "the same number on every rank, so the work is exactly even:",
        Command("cpinspect layout --cp 2 --seqlens 16"),
        f"Both ranks now compute {n['z0']} pairs. The colour key (in a terminal) and the rank digits in the "
        "cells show who holds what; the `local rows` part shows the order in memory: chunk `r` first, then its "
        "mirror.",
        "## 3. All three layouts side by side",
        "`--compare` draws zigzag, sequence-zigzag (the whole row as one sequence) and contiguous for the same "
        "row, then the work table:",
        Command("cpinspect layout --cp 4 --seqlens 32 --compare"),
        "## 4. Packed rows: zigzag per document",
        "A packed THD row holds several samples, described by `cu_seqlens`. Megatron's per-document split cuts "
        "**each segment** into `2*cp` chunks, so every rank gets a head and a tail of every sample. On every rank "
        "segment `i` then starts at local offset `cu[i]/cp` (the ▲ marks), while the `cu_seqlens` handed to "
        "attention stay global. This is the worked example `cu_seqlens = [0, 8, 24]`:",
        Command("cpinspect layout --cp 2 --seqlens 8,16"),
        "The same as JSON (chunk `end` is exclusive), for scripts and tests:",
        Command("cpinspect layout --cp 2 --seqlens 8,16 --json"),
        "## 5. Per-document is not per-sequence",
        "Cutting the same 24 tokens as one sequence (BSHD-style `get_batch_on_this_cp_rank` without "
        "`cu_seqlens`) gives different tokens to each rank. Mixing the two layouts between the data loader and "
        "the model is a classic source of misplaced embeddings. Because attention restarts at every segment "
        f"boundary, the per-sequence split is not even balanced any more ({n['seq']}x):",
        Command("cpinspect layout --cp 2 --seqlens 8,16 --layout sequence-zigzag"),
        "## 6. Every segment must divide by 2·cp",
        "A segment of 12 tokens cannot be cut into 8 equal chunks. cpinspect names the segment and the next "
        "multiple; frameworks pad each segment, and `--pad` does the same:",
        Command("cpinspect layout --cp 4 --seqlens 12,20"),
        Command("cpinspect layout --cp 4 --seqlens 12,20 --pad"),
        "## 7. Vision tokens inside the chunks",
        "A Qwen-VL vision encoder returns one embedding row per vision token, in the natural order of the full "
        "row. With a batch, `--vision` marks vision tokens in every chunk (█ all vision, ▓ ▒ ░ some, · none) and "
        "lists which rows land on which rank. The first image crosses all four chunks of segment 0, so rank 0 "
        "holds its first and last rows and rank 1 the middle: rank 0's rows are not contiguous.",
        Command("cpinspect layout --cp 2 examples/qwen3vl_packed.pt --vision"),
        "## 8. Why pre-sharded vision rows need a count all-gather",
        "When `input_ids` arrive already sharded (miles/slime `slice_with_cp`), a rank sees only its own chunks. "
        "To find its rows it needs the first row of each of its chunks: the number of vision tokens *before* "
        "that chunk in natural order, and most of those sit in chunks other ranks hold. So every rank counts "
        "vision tokens per chunk, all-gathers the `[S, 2]` counts, rebuilds the `[S, 2cp]` table and takes "
        "offsets. `--explain` walks one rank through it with its real numbers:",
        Command("cpinspect simulate --cp 2 examples/presharded_cp2 --rank 0 --explain"),
        "A rank can hold no vision token at all (rank 0 under cp 4 in this batch). It selects no rows, but it "
        "must still join the all-gather, or the other ranks wait for it forever:",
        Command("cpinspect simulate --cp 4 examples/qwen3vl_packed.pt --rank 0 --explain"),
        "## 9. Play with it: the explorer page",
        "`cpinspect explore` writes the same pictures as one self-contained HTML page (no network needed) with "
        "controls for cp, the layout, the segment lengths and the vision spans. Every view is linked: point at a "
        "token and its global index, segment, chunk, owning rank, local index and embedding row show up, and the "
        "token lights up in the packed row, its rank's local row and the embedding rows. A stepper walks the "
        "chosen rank through the seven steps above. For the setting it was built with, the page checks its own "
        "numbers against `simulate --json` and `layout --json` when it opens.",
        "```bash\ncpinspect explore examples/qwen3vl_packed.pt --cp 4 -o explorer.html   # then open explorer.html"
        "\n```",
        "The bundled example at cp 2, the pointer on a token of the first image (`python docs/make_screenshots.py` "
        "takes these pictures with headless Chromium):",
        "![cpinspect explore examples/qwen3vl_packed.pt --cp 2](explore-cp2.png)",
        "And at cp 4, where rank 0 holds no vision token:",
        "![cpinspect explore examples/qwen3vl_packed.pt --cp 4](explore-cp4.png)",
        "## Where to go next",
        "`cpinspect simulate` checks every rank of your own batch against an independent oracle; "
        "`cpinspect layout --svg FILE` / `--html FILE` save any of the pictures above (in colour) for slides "
        "and reviews. See the README for the options and the JSON format.",
    ]


def render_tutorial() -> str:
    """The whole of ``docs/zigzag.md``, freshly computed."""
    numbers = _numbers()
    parts = [console_block(part.line) if isinstance(part, Command) else part for part in sections(numbers)]
    header = "<!-- generated by docs/make_tutorial.py from the tool's real output: do not edit by hand -->"
    return header + "\n\n" + "\n\n".join(parts) + "\n"


def render_picture() -> str:
    """The README's SVG, written by the CLI's own ``--svg`` export."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "picture.svg"
        code, output = run_cli(f"{PICTURE_COMMAND} --svg {shlex.quote(str(target))}")
        if code:
            raise RuntimeError(f"{PICTURE_COMMAND} failed with exit code {code}: {output}")
        return target.read_text(encoding="utf-8")


def main(argv: list[str]) -> int:
    import os

    os.chdir(ROOT)  # the commands name examples/ relative to the repository root
    fresh = {TUTORIAL: render_tutorial(), PICTURE: render_picture()}
    stale = [path for path, text in fresh.items() if not path.exists() or path.read_text(encoding="utf-8") != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python docs/make_tutorial.py")
        return 1 if stale else 0
    for path in stale:
        path.write_text(fresh[path], encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # run as a script from a checkout without an installed cpinspect
        sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
