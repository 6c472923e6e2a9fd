"""Reading what a batch source holds: ``.pt``/``.safetensors`` files, ``rank{r}`` directories, dicts.

Only ``torch.load(..., weights_only=True)`` (with inert stand-ins for framework classes,
:mod:`cpinspect.core.unpickle`) and safetensors are used: nothing from a file is executed.
Picking and validating the fields is :mod:`cpinspect.core.loading`.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cpinspect.core.batch import BatchSource
from cpinspect.core.errors import InputError

RANK_FILE = re.compile(r"^rank(\d+)\.(pt|safetensors)$")

EXPANSION_LIMIT = 100
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

Part = tuple[str, dict[str, Any]]
"""One source of fields: its name (a path, ``<dict>``, ``<rank r dict>``) and its raw entries."""


def read_source(source: BatchSource, *, max_bytes: int | None = None) -> list[Part]:
    """The raw parts of a path (file or ``rank{r}`` directory), a dict, or a list of either, in rank order."""
    if isinstance(source, Mapping):
        return [("<dict>", dict(source))]
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        files = rank_files(path) if path.is_dir() else [path]
        return [(str(f), read_file(f, max_bytes=max_bytes)) for f in files]
    items = list(source)
    if not items:
        raise InputError("an empty list of batch files was given", fix="pass one file per rank, in rank order")
    return [(f"<rank {r} dict>", dict(p)) if isinstance(p, Mapping)
            else (str(p), read_file(Path(p), max_bytes=max_bytes)) for r, p in enumerate(items)]


def source_name(source: BatchSource) -> str:
    """How messages name ``source``: the path, ``<dict>``, or the list's names joined."""
    if isinstance(source, Mapping):
        return "<dict>"
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return ", ".join(f"<rank {r} dict>" if isinstance(p, Mapping) else str(p) for r, p in enumerate(source))


def rank_files(directory: Path) -> list[Path]:
    """``rank0.pt``, ``rank1.pt``, ... of a pre-sharded batch directory, in rank order, none missing."""
    by_rank: dict[int, Path] = {}
    for entry in sorted(directory.iterdir()):
        match = RANK_FILE.match(entry.name)
        if not match:
            continue
        rank = int(match.group(1))
        if rank in by_rank:
            raise InputError(
                f"rank {rank} appears twice: {by_rank[rank].name} and {entry.name}",
                where=str(directory),
                fix="keep exactly one rank{r}.pt or rank{r}.safetensors file per rank",
            )
        by_rank[rank] = entry
    if not by_rank:
        raise InputError(
            "the directory holds no rank files",
            where=str(directory),
            fix="a pre-sharded batch directory needs files named rank0.pt, rank1.pt, ... (or .safetensors)",
        )
    missing = [r for r in range(max(by_rank) + 1) if r not in by_rank]
    if missing:
        raise InputError(
            f"rank file(s) for rank {', '.join(map(str, missing))} are missing (found ranks "
            f"{', '.join(map(str, sorted(by_rank)))})",
            where=str(directory),
            fix="save every CP rank's local batch as rank{r}.pt; a simulation needs all of them",
        )
    return [by_rank[r] for r in range(len(by_rank))]


def read_file(path: Path, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The named entries of one ``.pt``/``.pth`` (weights-only) or ``.safetensors`` file.

    Declared sizes are checked before anything is read (:func:`check_declared_sizes`).
    """
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"the path {path} is a symbolic link loop (it points back to itself)", where=str(path),
                             fix="point the link at the real batch file") from None
        if path.is_symlink():
            raise InputError(f"the path {path} is a symbolic link to a missing file ({os.readlink(path)})",
                             where=str(path), fix="point the link at the real batch file") from None
        if exc.errno == errno.EACCES:
            raise InputError(f"the file {path} cannot be read (permission denied)", where=str(path),
                             fix="make it readable (chmod u+r) or copy it somewhere readable") from None
        raise InputError(f"the file {path} does not exist", where=str(path), fix="check the path") from None
    if path.is_dir():
        raise InputError(f"{path} is a directory", where=str(path), fix="pass it as a pre-sharded batch directory")
    try:
        open(path, "rb").close()  # the permission, checked before any reader (zipfile hides it, torch raises it raw)
    except PermissionError:
        raise InputError(f"the file {path} cannot be read (permission denied)", where=str(path),
                         fix="make it readable (chmod u+r) or copy it somewhere readable") from None
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise InputError(
            f"unknown file extension {path.suffix or '(none)'!r}",
            where=str(path),
            fix="save the batch as .pt (a dict of tensors) or .safetensors",
        )
    check_declared_sizes(path, max_bytes=max_bytes)
    if suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def default_max_bytes() -> int:
    """Half the memory available now (``MemAvailable``), the default limit on what a file may declare."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def check_declared_sizes(path: Path, *, max_bytes: int | None = None) -> int:
    """The bytes a file declares it will expand to; refuse (exit 2) a hostile declaration before reading it.

    A ``.pt`` is a zip: an entry declaring more than ``EXPANSION_LIMIT`` times its stored bytes is
    refused (``torch.save`` stores entries uncompressed), and so is a declared total above
    ``max_bytes`` (default: :func:`default_max_bytes`). A ``.safetensors`` header declares each
    tensor's byte range; the same total limit applies.
    """
    limit = default_max_bytes() if max_bytes is None else max_bytes
    if path.suffix.lower() == ".safetensors":
        total = _safetensors_declared(path)
    elif zipfile.is_zipfile(path):
        total = 0
        try:
            entries = zipfile.ZipFile(path).infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise InputError(f"the .pt file could not be read ({_first_line(exc)[:160]})", where=str(path),
                             fix="the file is truncated or corrupt: save it again with torch.save") from None
        for entry in entries:
            if entry.file_size > EXPANSION_LIMIT * max(entry.compress_size, 1):
                raise InputError(
                    f"refused to read the file: its entry {entry.filename} declares {entry.file_size:,} bytes "
                    f"from {entry.compress_size:,} stored bytes (more than {EXPANSION_LIMIT}x; torch.save stores "
                    "entries uncompressed, so the file was crafted or re-compressed)",
                    where=f"{path}, entry {entry.filename}",
                    fix="save the batch again with torch.save (no re-zipping); nothing was decompressed",
                )
            total += entry.file_size
    else:
        total = path.stat().st_size
    if total > limit:
        raise InputError(
            f"refused to read the file: it declares {total:,} bytes, above the limit of {limit:,} bytes "
            "(half the available memory unless --max-bytes says otherwise)",
            where=str(path),
            fix="raise the limit with --max-bytes N if the batch really is that large, or save a smaller batch",
        )
    return total


def _safetensors_declared(path: Path) -> int:
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > min(size - 8, 100 << 20):
                return size  # malformed: safetensors itself says what is wrong
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError):
        return size
    total = length + 8
    if isinstance(header, dict):
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            shape = info.get("shape")
            if isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape):
                count = 1
                for d in shape:
                    count *= d
                total += count * _DTYPE_BYTES.get(str(info.get("dtype")), 8)
    return total


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"the safetensors file could not be read ({_first_line(exc)})",
            where=str(path),
            fix="the file is truncated or corrupt: save it again with safetensors.torch.save_file",
        ) from None


def _read_torch(path: Path) -> dict[str, Any]:
    from cpinspect.core.unpickle import refusal, stand_ins

    with open(path, "rb") as handle:
        head = handle.read(2)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and head == b"PK":
        raise InputError("the .pt file could not be read (a zip archive that is truncated or corrupt)",
                         where=str(path), fix="the file is truncated or corrupt: save it again with torch.save")
    if not is_zip and (len(head) < 2 or head[0] != 0x80):
        raise InputError(
            "the file is not a torch.save file: it is neither a torch zip archive nor a pickle "
            f"(it starts with {head!r})",
            where=str(path),
            fix="save the batch with torch.save({'input_ids': ids, 'cu_seqlens': cu}, path) or as .safetensors",
        )
    unsafe: list[str] = []
    if is_zip:
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - unreadable pickles are reported by torch.load below
            unsafe = []
        refused = [why for why in map(refusal, unsafe) if why]
        if refused:
            raise InputError(
                f"refused to load the file: it names {len(refused)} global(s) that could run code: "
                f"{'; '.join(refused[:3])}",
                where=str(path),
                fix="save plain tensors, dicts and dataclass objects only (torch.save({'input_ids': ids, "
                "'cu_seqlens': cu}, path)) or use .safetensors; nothing from the file was executed",
            )
    try:
        with stand_ins(unsafe):
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        called = re.search(r"the file calls (\S+)\(\.\.\.\)", str(exc))
        if called is None:
            raise InputError(
                "refused to load the file: it needs a Python global that is neither a tensor, a container, a "
                f"number nor a plain class ({_offending(str(exc))})",
                where=str(path),
                fix="save a plain dict of tensors (torch.save({'input_ids': ids, 'cu_seqlens': cu}, path)) "
                "or use .safetensors; nothing from the file was executed",
            ) from None
        raise InputError(
            f"refused to load the file: it calls {called.group(1)}(...) while unpickling (a __reduce__ payload), "
            "which cpinspect never does",
            where=str(path),
            fix="save the object's fields (a dict or a dataclass) rather than something rebuilt by a call; "
            "nothing from the file was executed",
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, TypeError, AttributeError) as exc:
        raise InputError(
            f"the .pt file could not be read ({_plain(_first_line(exc))[:160]})",
            where=str(path),
            fix="the file is truncated or corrupt: save it again with torch.save",
        ) from None
    if not isinstance(data, Mapping):
        raise InputError(
            f"the file holds a {type(data).__name__}, not a dict of named tensors",
            where=str(path),
            fix="save a dict such as {'input_ids': ids, 'cu_seqlens': cu}",
        )
    return dict(data)


def _plain(text: str) -> str:
    """``text`` without ANSI escape sequences, on one line."""
    return " ".join(_ANSI.sub("", text).split())


def _offending(text: str) -> str:
    """The global torch's refusal names (``GLOBAL os.system``, ``function <built-in ...>``), plainly."""
    text = _plain(text.split("WeightsUnpickler error:")[-1])
    match = re.search(r"GLOBAL (\S+)", text) or re.search(r"unrecognized function (.+?)(?: which|$)", text) \
        or re.search(r"but got (.+?)$", text)
    return f"offending: {match.group(1).rstrip('.')}" if match else text[:160]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
