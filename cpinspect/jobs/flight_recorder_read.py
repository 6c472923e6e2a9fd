"""Reading torch flight-recorder dumps: one pickle per rank, unpickled without building any object but plain data.

A dump (``torch._C._distributed_c10d._dump_fr_trace()``, or the file the NCCL watchdog writes to
``TORCH_FR_DUMP_TEMP_FILE`` + rank; its JSON twin ``_dump_fr_trace_json()`` is read too) is a
pickled dict: ``version``, ``pg_config``, ``pg_status`` and ``entries``, one dict per recorded
collective (``profiling_name`` such as ``gloo:all_gather`` or ``nccl:send 0->1``, ``process_group``
``(name, desc)``, ``collective_seq_id``, ``input_sizes``, ``input_dtypes``, ``state``, ``frames``,
...). The same keys serve gloo and NCCL from format 2.x on (torch 2.10 to 2.13 write "2.10").
gloo leaves ``state`` at ``scheduled`` and its ``pg_config`` empty, so completion comes from
``pg_status`` and membership from the dumps themselves.

The unpickler refuses every global (``find_class``) and every persistent id, so only dicts, lists,
tuples, sets, strings, bytes, numbers, bools and ``None`` can be built: a ``__reduce__`` payload
(``os.system``, ``eval``) needs a global and is refused before anything runs.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpinspect.core.errors import InputError
from cpinspect.core.files import default_max_bytes

DUMP_NAME = re.compile(r"^(?P<prefix>.*?)(?P<rank>\d+)$")
"""``<prefix><global rank>``, torch's naming (``TORCH_FR_DUMP_TEMP_FILE`` + rank)."""

DEFAULT_LIMIT = 256 << 20
"""Default largest dump read (bytes): plain pickled containers take up to ~60x their bytes in memory."""

REQUIRED = ("profiling_name", "process_group", "collective_seq_id", "input_sizes", "output_sizes", "state")


class RefusedPickle(pickle.UnpicklingError):
    """The dump names a global or a persistent id: something a plain-data dump never holds."""


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers, strings, bytes and numbers only."""

    def find_class(self, module: str, name: str) -> Any:
        raise RefusedPickle(f"the pickle asks for {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("the pickle holds a persistent id")


@dataclass(frozen=True)
class Frame:
    """One Python frame of a recorded stack (innermost first in :attr:`Entry.frames`)."""

    name: str
    filename: str
    line: int

    def where(self) -> str:
        return f"{self.filename}:{self.line}"


@dataclass(frozen=True)
class Entry:
    """One recorded collective or point-to-point op of one rank."""

    rank: int
    record_id: int
    group: str
    group_desc: str
    seq: int
    p2p_seq: int
    is_p2p: bool
    backend: str
    op: str
    peers: str
    input_sizes: tuple[tuple[int, ...], ...]
    output_sizes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...] | None
    output_dtypes: tuple[str, ...] | None
    state: str
    completed: bool
    frames: tuple[Frame, ...]
    time_created_ns: int

    def describe(self) -> str:
        """``all_gather #3 [[1]] -> [[2, 1]] Long``: op, sequence number, sizes and dtypes."""
        dtypes = "/".join(sorted(set(self.input_dtypes or ()) | set(self.output_dtypes or ())))
        peers = f" {self.peers}" if self.peers else ""
        number = f"p2p #{self.p2p_seq}" if self.is_p2p else f"#{self.seq}"
        return (f"{self.op}{peers} {number} {sizes_text(self.input_sizes)} -> {sizes_text(self.output_sizes)}"
                + (f" {dtypes}" if dtypes else ""))


@dataclass(frozen=True)
class GroupStatus:
    """``pg_status`` of one group on one rank: the last enqueued and completed collective numbers."""

    last_enqueued: int | None
    last_completed: int | None


@dataclass(frozen=True)
class Dump:
    """One rank's dump: where it came from, its format version, groups, status and entries."""

    rank: int
    path: str
    version: str
    members: dict[str, tuple[int, ...]]
    status: dict[str, GroupStatus]
    entries: tuple[Entry, ...]


def sizes_text(sizes: tuple[tuple[int, ...], ...]) -> str:
    return "[" + ", ".join("[" + ", ".join(map(str, s)) + "]" for s in sizes) + "]"


def read_dumps(directory: Path, *, max_bytes: int | None = None) -> list[Dump]:
    """Every rank's dump in ``directory`` (files ``<prefix><rank>`` with one common prefix), in rank order."""
    if not directory.is_dir():
        raise InputError("the flight-recorder directory does not exist or is not a directory", where=str(directory),
                         fix="pass the directory the dumps were written to (TORCH_FR_DUMP_TEMP_FILE's directory)")
    files = dump_files(directory)
    limit = max_bytes if max_bytes is not None else min(DEFAULT_LIMIT, default_max_bytes() // 64)
    return [read_dump(path, rank, limit=limit) for rank, path in sorted(files.items())]


def dump_files(directory: Path) -> dict[int, Path]:
    """``{rank: path}`` of the files named ``<prefix><rank>``; one prefix only."""
    by_prefix: dict[str, dict[int, Path]] = {}
    for path in sorted(directory.iterdir()):
        match = DUMP_NAME.match(path.name)
        if match and path.is_file() and not path.name.startswith("."):
            by_prefix.setdefault(match.group("prefix"), {})[int(match.group("rank"))] = path
    if not by_prefix:
        raise InputError("the directory holds no flight-recorder dump (no file named <prefix><rank>)",
                         where=str(directory),
                         fix="point --flight-recorder at the directory of TORCH_FR_DUMP_TEMP_FILE (files such as "
                             "nccl_trace_rank_0, nccl_trace_rank_1, ...)")
    if len(by_prefix) > 1:
        names = ", ".join(f"{prefix}<rank> ({len(files)} file(s))" for prefix, files in sorted(by_prefix.items()))
        raise InputError(f"the directory holds dumps with {len(by_prefix)} different name prefixes: {names}",
                         where=str(directory), fix="put the dumps of one job, and nothing else, in the directory")
    return next(iter(by_prefix.values()))


def read_dump(path: Path, rank: int, *, limit: int) -> Dump:
    """One dump file, size-checked, unpickled as plain data, and validated."""
    size = path.stat().st_size
    if size > limit:
        raise InputError(f"refused to read the dump: it has {size:,} bytes, above the limit of {limit:,} bytes",
                         where=str(path), fix="raise the limit with --max-bytes N if the dump really is that large")
    raw = path.read_bytes()
    if raw.lstrip()[:1] == b"{":  # _dump_fr_trace_json / _dump_nccl_trace_json: the same keys, no stacks
        return parse_dump(read_json(raw, path), rank, str(path))
    try:
        data = PlainUnpickler(io.BytesIO(raw)).load()
    except RefusedPickle as exc:
        raise InputError(f"refused to read the dump: {exc}, which a flight-recorder dump never does (loading it "
                         "with pickle.load could run code); nothing in it was run", where=str(path),
                         fix="use only dumps written by torch's flight recorder; do not open this file with "
                             "pickle.load or torch's fr_trace") from None
    except (Exception, RecursionError) as exc:  # any malformed pickle: EOFError, UnpicklingError, ValueError, ...
        raise InputError(f"the file is not a readable pickle ({type(exc).__name__}: {str(exc)[:160]})",
                         where=str(path), fix="the dump is truncated or is not a flight-recorder dump") from None
    return parse_dump(data, rank, str(path))


def read_json(raw: bytes, path: Path) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"the file starts like JSON but is not readable JSON ({str(exc)[:160]})", where=str(path),
                         fix="the dump is truncated or is not a flight-recorder dump") from None


def parse_dump(data: Any, rank: int, path: str) -> Dump:
    """A :class:`Dump` from the unpickled dict, or a plain error naming the missing or malformed key."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise InputError("the pickle is not a flight-recorder dump (no list under the key 'entries')", where=path,
                         fix="pass the files torch's flight recorder wrote (_dump_fr_trace or the watchdog's dump)")
    version = str(data.get("version", "?"))
    status = parse_status(data.get("pg_status"))
    entries = tuple(completion(parse_entry(raw, rank, f"{path}, entry {i}"), status)
                    for i, raw in enumerate(data["entries"]))
    return Dump(rank, path, version, parse_members(data.get("pg_config"), path), status, entries)


def completion(entry: Entry, status: dict[str, GroupStatus]) -> Entry:
    """``entry`` marked completed when ``pg_status`` says its group completed that collective number.

    NCCL sets ``state`` to ``completed``; gloo never moves ``state`` past ``scheduled``, and its
    ``last_completed_collective`` is what says a collective finished.
    """
    last = status.get(entry.group, GroupStatus(None, None)).last_completed
    done = entry.completed or (not entry.is_p2p and last is not None and entry.seq <= last)
    return entry if done == entry.completed else dataclasses.replace(entry, completed=done)


def parse_entry(raw: Any, rank: int, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise InputError("a recorded entry is not a dict", where=where, fix="the dump is corrupt")
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise InputError(f"a recorded entry lacks the key(s) {', '.join(missing)}", where=where,
                         fix="the dump comes from a flight-recorder format cpinspect does not read (2.x expected)")
    try:
        backend, _, name = str(raw["profiling_name"]).partition(":")
        op, _, peers = name.partition(" ")
        group, desc = (str(raw["process_group"][0]), str(raw["process_group"][1]))
        state = str(raw["state"])
        return Entry(
            rank=rank, record_id=int(raw.get("record_id", 0)), group=group, group_desc=desc,
            seq=int(raw["collective_seq_id"]), p2p_seq=int(raw.get("p2p_seq_id", 0)),
            is_p2p=bool(raw.get("is_p2p", op in ("send", "recv"))), backend=backend, op=op or backend, peers=peers,
            input_sizes=_sizes(raw["input_sizes"]), output_sizes=_sizes(raw["output_sizes"]),
            input_dtypes=_dtypes(raw.get("input_dtypes")), output_dtypes=_dtypes(raw.get("output_dtypes")),
            state=state, completed=state == "completed", frames=tuple(_frame(f) for f in raw.get("frames") or ()),
            time_created_ns=int(raw.get("time_created_ns") or 0),
        )
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, RecursionError) as exc:
        raise InputError(f"a recorded entry is malformed ({type(exc).__name__}: {str(exc)[:120]})", where=where,
                         fix="the dump is corrupt or from an unknown flight-recorder format") from None


def parse_members(config: Any, path: str) -> dict[str, tuple[int, ...]]:
    """``{group name: global ranks}`` from ``pg_config`` (NCCL fills it; gloo leaves one nameless entry)."""
    members: dict[str, tuple[int, ...]] = {}
    if not isinstance(config, dict):
        return members
    for key, value in config.items():
        if not isinstance(value, dict) or not key:
            continue
        ranks = value.get("ranks")
        try:
            parsed: Any = ast.literal_eval(ranks) if isinstance(ranks, str) else ranks  # literals only, no code
            members[str(key)] = tuple(int(r) for r in parsed)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            raise InputError(f"the group {key!r} lists its ranks as {str(ranks)[:80]!r}, not a list of numbers",
                             where=f"{path}, pg_config", fix="the dump is corrupt") from None
    return members


def parse_status(status: Any) -> dict[str, GroupStatus]:
    out: dict[str, GroupStatus] = {}
    if not isinstance(status, dict):
        return out
    for key, value in status.items():
        if isinstance(value, dict):
            out[str(key)] = GroupStatus(_number(value.get("last_enqueued_collective")),
                                        _number(value.get("last_completed_collective")))
    return out


def _number(value: Any) -> int | None:
    """A non-negative collective number (the JSON dumps write them as strings), else ``None`` (-1: none yet)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _sizes(raw: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in size) for size in raw)


def _dtypes(raw: Any) -> tuple[str, ...] | None:
    return None if raw is None else tuple(str(d) for d in raw)


def _frame(raw: Any) -> Frame:
    return Frame(str(raw.get("name", "?")), str(raw.get("filename", "?")), int(raw.get("line") or 0))
