"""The view of ``simulate --vision-dp``: per rank, items, patches, merged rows, gathered rows, collectives.

``python -m cpinspect.views.vision_dp`` draws the demo batch's vision-DP step at cp=2.
"""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from cpinspect.core.ranges import format_ranges
from cpinspect.simulation.vision_dp import VisionDPExtension
from cpinspect.views.positions import render_findings
from cpinspect.views.simulate import rank_style


def render(ext: VisionDPExtension, console: Console, *, rank: int | None = None, full: bool = False) -> None:
    """Print the ``--vision-dp`` section of a simulation to ``console``."""
    console.print(render_vision_dp(ext, rank=rank, full=full))


def render_vision_dp(ext: VisionDPExtension, *, rank: int | None = None, full: bool = False) -> RenderableType:
    """Per rank: items, patches, merged rows, gathered rows, collectives; then the checks."""
    plan = ext.plan
    if plan is None:
        return Text("vision DP: not simulated")
    unit = "images and video frames" if ext.model == "qwen3-vl" else "images and videos"
    parts: list[RenderableType] = [Text(
        f"vision DP: {plan.items.count} item(s) ({unit}) split over {plan.cp} CP rank(s) {plan.assigned_by}; "
        f"{ext.deepstack_layers} deepstack feature(s) gathered alongside", style="bold")]
    parts.append(_rank_table(ext, rank, full))
    sizes = plan.rows_per_rank.tolist()
    parts.append(Text(f"all-gather sizes (rows per rank): {sizes}; each rank sends {max(sizes, default=0)} rows "
                      f"(padded) and keeps {sum(sizes)}"))
    if not any(f.code in ("VISION_DP_EMPTY_RANK_SKIPS_COLLECTIVE", "COLLECTIVE_DIVERGENCE") for f in ext.findings):
        parts.append(_check_line(ext.natural_order, "gathered rows come back in natural order 0..V-1",
                                 "gathered rows are NOT in natural order"))
        parts.append(_check_line(ext.selection_fed, "each rank's selected rows of the gathered embeddings (and "
                                 "deepstack) are exactly its own vision tokens' embeddings",
                                 "some rank selects other tokens' embeddings from the gathered rows"))
    if ext.mixed:
        parts.append(_run_table(ext, rank))
    parts.append(render_findings(ext.findings))
    return Group(*parts)


def _check_line(good: bool, ok_text: str, bad_text: str) -> Text:
    return Text(f"✓ {ok_text}", style="green") if good else Text(f"✗ {bad_text}", style="bold red")


def _rank_table(ext: VisionDPExtension, rank: int | None, full: bool) -> Table:
    table = Table()
    for name in ("rank", "items encoded", "patches → rows", "natural rows", "collectives", "grad"):
        table.add_column(name, overflow="fold")
    for view in ext.ranks if rank is None else [ext.ranks[rank]]:
        items = view.items if full or len(view.items) <= 6 else [*view.items[:5], f"... {len(view.items) - 5} more"]
        grad = "-" if view.grad_ok is None else ("✓ 1 per row" if view.grad_ok else "✗ not 1 per row")
        table.add_row(Text(f" {view.rank} ", style=rank_style(view.rank)), ", ".join(items) or "(none: sends 0 rows)",
                      f"{view.patches} → {view.rows}", format_ranges(view.natural_rows, limit=None if full else 6),
                      "\n".join(view.collectives) or "-", grad)
    return table


def _run_table(ext: VisionDPExtension, rank: int | None) -> RenderableType:
    table = Table()
    for name in ("rank", "image runs", "video runs", "runs", "sum(t)", "reorganize_inputs assertion"):
        table.add_column(name)
    for view in ext.ranks if rank is None else [ext.ranks[rank]]:
        count = view.run_count
        if count is None:
            continue
        verdict = "passes" if count.passes else (
            f"AssertionError ({count.runs} != {count.expected})" if count.runs != count.expected else
            "run lengths differ from the items: the per-item size check fails")
        table.add_row(str(view.rank), str(count.image_runs), str(count.video_runs), str(count.runs),
                      str(count.expected), verdict)
    title = Text("what Megatron-Bridge reorganize_inputs sees per rank (images and videos in one row, reference §2.7)",
                 style="bold")
    return Group(title, table)


if __name__ == "__main__":
    from cpinspect.core.synth import demo_batch
    from cpinspect.simulation.run import simulate

    demo = VisionDPExtension(demo_batch())
    demo.run(simulate(demo.batch, 2))
    render(demo, Console())
