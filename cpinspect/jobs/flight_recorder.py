"""``cpinspect analyze --flight-recorder DIR``: the first collective where a real job's ranks diverged.

Read (:mod:`cpinspect.jobs.flight_recorder_read`) → per process group, walk the collective numbers
every member recorded and compare the ranks' entries → each rank's last completed and pending
collective with its stack → the CP site each stack names (:mod:`cpinspect.jobs.flight_recorder_sites`).

A collective number ``n`` of a group diverges when a member rank never enqueued it while others did
(``missing_ranks``: its ``pg_status`` or its entries end before ``n``), or when the ranks' entries
differ in op, input or output sizes, or dtypes. Completion is shown, not compared: a rank notes a
finished collective only when its watchdog (NCCL) or its next call (gloo) discovers it, so two ranks
dumped a moment apart can differ there with nothing wrong. Sizes are not compared where ranks may
legitimately differ (all-to-all and the ``_v`` variants: both; scatter: inputs; gather: outputs), the
same exemptions torch's analyzer makes. Point-to-point entries are shown, not matched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpinspect.jobs.flight_recorder_read import Dump, Entry, Frame, read_dumps, sizes_text
from cpinspect.jobs.flight_recorder_sites import CpSite, recognise
from cpinspect.jobs.flight_recorder_torch import torch_verdict

# what torch's analyzer calls each kind (MatchState names; "missing" is its "Not all ranks joining collective")
TORCH_WORDS = {"missing_ranks": "Not all ranks joining collective", "op": "COLLECTIVE_TYPE_MISMATCH",
               "shape": "SIZE_OR_SYNTAX_MISMATCH", "dtype": "COLLECTIVE_DTYPE_MISMATCH"}
FREE_INPUTS = ("all_to_all", "scatter", "_v")
FREE_OUTPUTS = ("all_to_all", "gather", "_v")


@dataclass(frozen=True)
class Group:
    """A process group as the dumps describe it; ``inferred`` when no dump listed its ranks (gloo)."""

    name: str
    desc: str
    members: tuple[int, ...]
    inferred: bool

    def label(self) -> str:
        desc = f" ({self.desc})" if self.desc and self.desc != "undefined" else ""
        return f"group {self.name}{desc}, global ranks {list(self.members)}"


@dataclass(frozen=True)
class Divergence:
    """The first collective number of one group at which the ranks' records disagree."""

    group: Group
    seq: int
    kind: str
    message: str
    entries: dict[int, Entry]
    missing_ranks: tuple[int, ...]
    differing_ranks: tuple[int, ...]
    torch_verdict: str | None = None

    def site(self, rank: int) -> CpSite | None:
        entry = self.entries.get(rank)
        return None if entry is None else recognise(entry.op, entry.frames, skipped=self.kind == "missing_ranks")

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group.name, "group_desc": self.group.desc, "global_ranks": list(self.group.members),
                "seq": self.seq, "kind": self.kind, "torch_words": TORCH_WORDS[self.kind], "message": self.message,
                "missing_ranks": list(self.missing_ranks), "differing_ranks": list(self.differing_ranks),
                "torch_verdict": self.torch_verdict,
                "ranks": {str(r): entry_dict(e, self.kind == "missing_ranks") for r, e in sorted(self.entries.items())}}


@dataclass(frozen=True)
class RankState:
    """Where one rank stood when it dumped: its last completed, its first not completed, and its last op."""

    rank: int
    last_completed: Entry | None
    pending: Entry | None
    last_entered: Entry | None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "last_completed": None if self.last_completed is None
                else entry_dict(self.last_completed),
                "pending": None if self.pending is None else entry_dict(self.pending),
                "last_entered": None if self.last_entered is None else entry_dict(self.last_entered)}


@dataclass
class FlightReport:
    """Everything ``analyze --flight-recorder`` found; ``divergences`` earliest first."""

    directory: str
    dumps: list[Dump]
    groups: list[Group]
    divergences: list[Divergence]
    ranks: list[RankState]
    no_dump: dict[str, tuple[int, ...]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.divergences else 0

    @property
    def missing_ranks(self) -> tuple[int, ...]:
        return self.divergences[0].missing_ranks if self.divergences else ()

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "ok": not self.divergences, "exit_code": self.exit_code,
                "dumps": [{"rank": d.rank, "path": d.path, "version": d.version, "entries": len(d.entries)}
                          for d in self.dumps],
                "groups": [{"name": g.name, "desc": g.desc, "global_ranks": list(g.members),
                            "ranks_inferred": g.inferred} for g in self.groups],
                "missing_ranks": list(self.missing_ranks),
                "divergences": [d.to_dict() for d in self.divergences],
                "ranks": [r.to_dict() for r in self.ranks],
                "no_dump": {g: list(r) for g, r in self.no_dump.items()}, "notes": self.notes}


def entry_dict(entry: Entry, skipped: bool = True) -> dict[str, Any]:
    site = recognise(entry.op, entry.frames, skipped=skipped)
    return {"op": entry.op, "peers": entry.peers, "seq": entry.seq, "p2p_seq": entry.p2p_seq,
            "group": entry.group, "input_sizes": [list(s) for s in entry.input_sizes],
            "output_sizes": [list(s) for s in entry.output_sizes],
            "input_dtypes": None if entry.input_dtypes is None else list(entry.input_dtypes),
            "output_dtypes": None if entry.output_dtypes is None else list(entry.output_dtypes),
            "state": entry.state, "completed": entry.completed, "call_site": call_site(entry.frames),
            "frames": [{"name": f.name, "filename": f.filename, "line": f.line} for f in entry.frames],
            "cp_site": None if site is None else site.to_dict()}


def analyze_flight_recorder(directory: Path, *, max_bytes: int | None = None) -> FlightReport:
    """Read every rank's dump in ``directory`` and find where the ranks diverged."""
    return analyze_dumps(read_dumps(directory, max_bytes=max_bytes), str(directory))


def analyze_dumps(dumps: list[Dump], directory: str = "<dumps>") -> FlightReport:
    """The report for dumps already read (one per rank, in rank order)."""
    groups = find_groups(dumps)
    present = {d.rank for d in dumps}
    divergences = [d for g in groups if (d := first_divergence(g, dumps)) is not None]
    divergences.sort(key=lambda d: min((e.time_created_ns for e in d.entries.values()), default=0))
    report = FlightReport(directory, dumps, groups, divergences, [rank_state(d) for d in dumps])
    report.no_dump = {g.name: tuple(r for r in g.members if r not in present)
                      for g in groups if not set(g.members) <= present}
    p2p = sum(e.is_p2p for d in dumps for e in d.entries)
    if p2p:
        report.notes.append(f"{p2p} point-to-point entr{'y' if p2p == 1 else 'ies'} recorded: shown per rank, "
                            "not matched across ranks")
    if any(e.backend == "gloo" for d in dumps for e in d.entries):
        report.notes.append("gloo notes the end of a collective (completed, or timed out) some time after it "
                            "happened: a rank's 'last completed' and 'pending' can lag behind what it did")
    if any(g.inferred for g in groups):
        report.notes.append("the dumps list no ranks for some groups (gloo records none): their members are the "
                            "ranks whose dumps mention them, all dumped ranks for the default group")
    return report


def find_groups(dumps: list[Dump]) -> list[Group]:
    """Every group any dump mentions, with its members from ``pg_config`` or, failing that, the dumps."""
    described: dict[str, str] = {}
    for dump in dumps:
        for entry in dump.entries:
            described.setdefault(entry.group, entry.group_desc)
    groups = []
    for name, desc in sorted(described.items(), key=lambda kv: (len(kv[0]), kv[0])):
        listed = next((d.members[name] for d in dumps if name in d.members), None)
        if listed is not None:
            groups.append(Group(name, desc, tuple(sorted(listed)), False))
        elif desc == "default_pg":
            groups.append(Group(name, desc, tuple(d.rank for d in dumps), True))
        else:
            mentioned = tuple(d.rank for d in dumps if name in d.status or any(e.group == name for e in d.entries))
            groups.append(Group(name, desc, mentioned, True))
    return groups


def first_divergence(group: Group, dumps: list[Dump]) -> Divergence | None:
    """The lowest collective number of ``group`` at which its dumped members disagree, or ``None``."""
    by_rank = {d.rank: d for d in dumps if d.rank in group.members}
    records = {r: {e.seq: e for e in d.entries if e.group == group.name and not e.is_p2p} for r, d in by_rank.items()}
    enqueued = {r: last_enqueued(by_rank[r], group.name, records[r]) for r in by_rank}
    firsts = [min(seqs) for seqs in records.values() if seqs]
    if not firsts:
        return None
    # a ring buffer keeps only the newest entries: start where every rank's record has begun
    for seq in range(max(firsts), max(max(s) for s in records.values() if s) + 1):
        entries = {r: seqs[seq] for r, seqs in records.items() if seq in seqs}
        if not entries:
            continue
        missing = tuple(r for r in sorted(by_rank) if seq not in records[r] and seq > enqueued[r])
        found = missing_divergence(group, seq, entries, missing) if missing else compare(group, seq, entries)
        if found is not None:
            return found
    return None


def last_enqueued(dump: Dump, group: str, seqs: dict[int, Entry]) -> int:
    status = dump.status.get(group)
    recorded = max(seqs, default=0)
    return recorded if status is None or status.last_enqueued is None else max(status.last_enqueued, recorded)


def missing_divergence(group: Group, seq: int, entries: dict[int, Entry], missing: tuple[int, ...]) -> Divergence:
    first = entries[min(entries)]
    waiting = [r for r, e in sorted(entries.items()) if not e.completed]
    verb = "wait in" if waiting else "entered"
    message = (f"rank(s) {ranks_text(missing)} never entered {first.op} #{seq} of {group.label()}, which rank(s) "
               f"{ranks_text(sorted(entries))} {verb}")
    return Divergence(group, seq, "missing_ranks", message, entries, missing, missing)


def compare(group: Group, seq: int, entries: dict[int, Entry]) -> Divergence | None:
    """The first aspect (op, sizes, dtypes) in which the entries of one collective differ."""
    op = entries[min(entries)].op
    aspects: list[tuple[str, str, Callable[[Entry], Any], Callable[[Any], str]]] = [
        ("op", "ranks called different collectives", lambda e: e.op, str)]
    if not any(tag in op for tag in FREE_INPUTS):
        aspects.append(("shape", "input sizes differ", lambda e: e.input_sizes, sizes_text))
    if not any(tag in op for tag in FREE_OUTPUTS):
        aspects.append(("shape", "output sizes differ", lambda e: e.output_sizes, sizes_text))
    aspects.append(("dtype", "dtypes differ", dtypes_of, lambda v: "/".join(v) or "-"))
    for kind, what, key, show in aspects:
        values = {r: key(e) for r, e in entries.items()}
        if len(set(values.values())) > 1:
            reference, _ = Counter(values[r] for r in sorted(values)).most_common(1)[0]
            differing = tuple(r for r in sorted(values) if values[r] != reference)
            per_rank = "; ".join(f"rank {r}: {show(v)}" for r, v in sorted(values.items()))
            message = f"{op} #{seq} of {group.label()}: {what} ({per_rank})"
            agreeing = next(r for r in sorted(values) if values[r] == reference)
            verdict = torch_verdict(entries[agreeing], entries[differing[0]], group.members)
            return Divergence(group, seq, kind, message, entries, (), differing, verdict)
    return None


def dtypes_of(entry: Entry) -> tuple[str, ...]:
    """The dtypes of the entry's non-empty tensors (an empty tensor's dtype carries no data)."""
    found: set[str] = set()
    for sizes, dtypes in ((entry.input_sizes, entry.input_dtypes), (entry.output_sizes, entry.output_dtypes)):
        if dtypes and any(all(d > 0 for d in s) for s in sizes):
            found.update(dtypes)
    return tuple(sorted(found))


def rank_state(dump: Dump) -> RankState:
    ordered = sorted(dump.entries, key=lambda e: e.record_id)
    done = [e for e in ordered if e.completed]
    pending = [e for e in ordered if not e.completed]
    return RankState(dump.rank, done[-1] if done else None, pending[0] if pending else None,
                     ordered[-1] if ordered else None)


def is_library_frame(filename: str) -> bool:
    """torch's own frames (and the wrappers it installs), judged from the recorded path alone.

    The dumps come from another machine, so the local install directories (what
    :mod:`cpinspect.groups.callsite` compares with) say nothing about them.
    """
    parts = filename.replace("\\", "/").split("/")
    for index, part in enumerate(parts[:-1]):
        if part in ("site-packages", "dist-packages") and parts[index + 1] in ("torch", "typing_extensions.py"):
            return True
    return filename.startswith("<")


def user_frames(frames: tuple[Frame, ...]) -> tuple[Frame, ...]:
    return tuple(f for f in frames if not is_library_frame(f.filename))


def call_site(frames: tuple[Frame, ...]) -> str:
    """``file:line`` of the innermost frame that is not torch's ("" when the entry has no stack)."""
    users = user_frames(frames)
    return users[0].where() if users else ""


def ranks_text(ranks: Any) -> str:
    return ", ".join(map(str, ranks))
