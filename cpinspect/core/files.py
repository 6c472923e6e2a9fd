"""Reading what a batch source holds: ``.pt``/``.safetensors`` files, ``rank{r}`` directories, dicts.

Only ``torch.load(..., weights_only=True)`` and safetensors are used: nothing is unpickled.
Picking and validating the fields is :mod:`cpinspect.core.loading`.
"""

from __future__ import annotations

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

Part = tuple[str, dict[str, Any]]
"""One source of fields: its name (a path, ``<dict>``, ``<rank r dict>``) and its raw entries."""


def read_source(source: BatchSource) -> list[Part]:
    """The raw parts of a path (file or ``rank{r}`` directory), a dict, or a list of either, in rank order."""
    if isinstance(source, Mapping):
        return [("<dict>", dict(source))]
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        files = rank_files(path) if path.is_dir() else [path]
        return [(str(f), read_file(f)) for f in files]
    items = list(source)
    if not items:
        raise InputError("an empty list of batch files was given", fix="pass one file per rank, in rank order")
    return [(f"<rank {r} dict>", dict(p)) if isinstance(p, Mapping) else (str(p), read_file(Path(p)))
            for r, p in enumerate(items)]


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


def read_file(path: Path) -> dict[str, Any]:
    """The named entries of one ``.pt``/``.pth`` (weights-only) or ``.safetensors`` file."""
    if not path.exists():
        raise InputError(f"the file {path} does not exist", where=str(path), fix="check the path")
    if path.is_dir():
        raise InputError(f"{path} is a directory", where=str(path), fix="pass it as a pre-sharded batch directory")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in (".pt", ".pth"):
        return _read_torch(path)
    raise InputError(
        f"unknown file extension {path.suffix or '(none)'!r}",
        where=str(path),
        fix="save the batch as .pt (a dict of tensors) or .safetensors",
    )


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
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            "refused to load the file: it holds Python objects other than tensors, containers and "
            f"numbers, and cpinspect only loads with weights_only=True ({_first_line(exc)[:160]})",
            where=str(path),
            fix="save a plain dict of tensors (torch.save({'input_ids': ids, 'cu_seqlens': cu}, path)) "
            "or use .safetensors; nothing from the file was executed",
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise InputError(
            f"the .pt file could not be read ({_first_line(exc)[:160]})",
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
