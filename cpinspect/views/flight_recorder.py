"""The rich view of ``cpinspect analyze --flight-recorder``: the first divergence, then every rank's last ops."""

from __future__ import annotations

from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from cpinspect.groups.callsite import short_path
from cpinspect.jobs.flight_recorder import Divergence, FlightReport, call_site, user_frames
from cpinspect.jobs.flight_recorder_read import Entry, sizes_text
from cpinspect.jobs.flight_recorder_sites import CpSite, recognise

STACK_DEPTH = 6


def render_flight_recorder(report: FlightReport, console: Console) -> None:
    """Dumps read, each divergence (first one first) with a per-rank table, each rank's position, a verdict."""
    versions = sorted({d.version for d in report.dumps})
    console.print(Text.assemble(("cpinspect analyze --flight-recorder ", "bold"), f"{report.directory}: "
                                f"{len(report.dumps)} dump(s) (ranks {', '.join(str(d.rank) for d in report.dumps)}"
                                f"; format {', '.join(versions)}), {len(report.groups)} group(s)"))
    last_ops = {state.rank: state.last_completed for state in report.ranks if state.last_completed is not None}
    for number, divergence in enumerate(report.divergences):
        render_divergence(divergence, console, first=number == 0, last_ops=last_ops)
    console.print(Rule("where each rank stood when it dumped", style="dim"))
    for state in report.ranks:
        console.print(Text(f"rank {state.rank}", style="bold"))
        render_position("last completed", state.last_completed, console)
        render_position("pending", state.pending, console)
        if state.last_entered not in (state.pending, state.last_completed):
            render_position("last entered", state.last_entered, console)
    for group, ranks in report.no_dump.items():
        console.print(Text(f"! no dump from rank(s) {', '.join(map(str, ranks))} of group {group}: what they did is "
                           "unknown", style="yellow"))
    for note in report.notes:
        console.print(Text(f"note: {note}", style="dim"))
    if report.divergences:
        first = report.divergences[0]
        console.print(Text(f"✗ the ranks diverge at collective #{first.seq} of group {first.group.name} "
                           f"({first.kind.replace('_', ' ')}); {len(report.divergences)} group(s) diverge",
                           style="bold red"))
    else:
        console.print(Text("✓ no divergence: in every group, the collectives all dumped ranks recorded have the same "
                           "op, sizes and dtypes", style="bold green"))


def render_divergence(divergence: Divergence, console: Console, *, first: bool,
                      last_ops: dict[int, Entry]) -> None:
    title = "first divergence" if first else "divergence"
    console.print(Rule(f"{title}: {divergence.group.label()}, collective #{divergence.seq}", style="red"))
    console.print(Text.assemble(("✗ ", "bold red"), (divergence.kind, "bold"), f"  {divergence.message}"))
    if divergence.torch_verdict:
        console.print(Text(f"  torch's matcher (Op.match): {divergence.torch_verdict}", style="dim"))
    table = Table(show_edge=False, pad_edge=False)
    for column in ("rank", "op", "input", "output", "dtypes", "call site"):
        table.add_column(column, overflow="fold")
    for rank in divergence.group.members:
        entry = divergence.entries.get(rank)
        if entry is None:
            missing = "never entered" if rank in divergence.missing_ranks else "no record"
            last = last_ops.get(rank)
            table.add_row(str(rank), Text(missing, style="bold red"), "", "", "",
                          f"its last: {last.op} #{last.seq}" if last is not None else "")
            continue
        style = "bold red" if rank in divergence.differing_ranks else ""
        table.add_row(str(rank), Text(entry.op, style=style), sizes_text(entry.input_sizes),
                      sizes_text(entry.output_sizes), "/".join(entry.input_dtypes or ()) or "-",
                      short_site(call_site(entry.frames)))
    console.print(table)
    shown: set[str] = set()
    for rank in sorted(divergence.entries):
        site = divergence.site(rank)
        if site is not None and site.site + site.evidence not in shown:
            shown.add(site.site + site.evidence)
            render_site(f"rank {rank}'s stack", site, console)


def render_site(who: str, site: CpSite, console: Console) -> None:
    evidence, _, where = site.evidence.rpartition(" (")
    console.print(Text.assemble(("→ ", "bold cyan"), f"{who} is ", (site.site, "bold"), f": {evidence} "
                                f"({short_site(where.rstrip(')'))})"))
    console.print(Text(f"  cpinspect: {site.finding}"))


def render_position(label: str, entry: Entry | None, console: Console) -> None:
    if entry is None:
        console.print(Text(f"  {label}: none"))
        return
    site = recognise(entry.op, entry.frames)
    console.print(Text.assemble(f"  {label}: ", (entry.describe(), "bold"), f" in group {entry.group} "
                                f"(state {entry.state})", (f", {site.site}" if site else "", "cyan")))
    for frame in user_frames(entry.frames)[:STACK_DEPTH]:
        console.print(Text(f"      {frame.name} at {short_site(frame.where())}", style="dim"))


def short_site(where: str) -> str:
    """``file:line`` with the file relative to the working directory when it lies below it."""
    path, _, line = where.rpartition(":")
    return f"{short_path(path)}:{line}" if path else where or "-"


if __name__ == "__main__":  # pragma: no cover - a demo for eyeballing the view
    from cpinspect.jobs.flight_recorder import analyze_dumps
    from cpinspect.jobs.flight_recorder_read import parse_dump

    def demo_entry(seq: int, op: str, sizes: list[list[int]], where: str) -> dict:
        return {"profiling_name": f"gloo:{op}", "process_group": ("1", "cp"), "collective_seq_id": seq,
                "input_sizes": sizes, "output_sizes": [[2, *s] for s in sizes], "input_dtypes": ["Long"],
                "output_dtypes": ["Long"], "state": "scheduled", "record_id": seq - 1,
                "frames": [{"name": "_get_cp_local_vision_embed_indices", "filename": where, "line": 88}]}

    steps = [demo_entry(s, "all_gather", [[4, 2]], "/job/bridge/vision.py") for s in (1, 2, 3)]
    demo = [parse_dump({"version": "2.10", "entries": steps[:n], "pg_config": {"1": {"ranks": "[0, 1]"}},
                        "pg_status": {"1": {"last_enqueued_collective": n, "last_completed_collective": 2}}},
                       rank, f"demo/trace_{rank}") for rank, n in ((0, 3), (1, 2))]
    render_flight_recorder(analyze_dumps(demo, "demo/"), Console())
