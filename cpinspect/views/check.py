"""The rich view of a ``cpinspect check`` report: its lines, coloured by kind. Rendering never computes.

``python -m cpinspect.views.check`` shows the view on a small check of a buggy demo function.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:  # the report's module imports torch; this view needs only its shape
    from cpinspect.check.report import ReportLine

STYLES = {"title": "", "pass": "bold green", "fail": "bold red", "detail": "dim", "body": "", "note": "yellow"}


def render_report(lines: Sequence[ReportLine], console: Console) -> None:
    """Print the report one physical line at a time, unwrapped, so replay commands stay copyable."""
    for kind, text in physical_lines(lines):
        console.print(Text(text, style=STYLES[kind]), soft_wrap=True)


def physical_lines(lines: Sequence[ReportLine]) -> Iterator[tuple[str, str]]:
    """``(kind, text)`` for each line of the report's plain text as ``str.splitlines`` cuts it.

    A message may carry line breaks of its own (a multi-line exception); each piece keeps the
    kind of the report line it starts in, and the pieces together are exactly the plain text.
    """
    plain = [line.plain for line in lines]
    ends = list(accumulate(len(text) + 1 for text in plain))  # offset just past each line's "\n"
    joined = "\n".join(plain)
    offset, index = 0, 0
    for piece, with_end in zip(joined.splitlines(), joined.splitlines(keepends=True)):
        while offset >= ends[index]:
            index += 1
        yield lines[index].kind, piece
        offset += len(with_end)


if __name__ == "__main__":  # pragma: no cover - a demo for eyeballing the view
    import torch

    from cpinspect.check.suite import run_check

    def rows_from_zero(vision_mask: torch.Tensor, cu_seqlens: torch.Tensor, *, vision_embed_count: int,
                       cp_group: object) -> torch.Tensor:
        """Numbers each rank's vision tokens from 0: wrong wherever an earlier piece holds vision tokens."""
        return torch.arange(int(vision_mask.sum()))

    render_report(run_check(rows_from_zero, cp=[2], cases=7, shrink=False).lines(), Console())
