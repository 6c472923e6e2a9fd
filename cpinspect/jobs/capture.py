"""Record what each CP rank saw just before its vision scatter: one safetensors file per rank and step.

Called from inside a training step (``cpinspect.jobs.capture.record(...)``), so it must never get in
the way: when capture is off it returns before touching a tensor; when it is on, every failure
(full disk, bad path, odd input) becomes a warning, never an exception in the training loop.
Each process writes only its own file, through a temporary name and an atomic rename, so ranks
writing at once and a reader listing the directory never see half a file. No collective is
issued: a capture cannot hang a job.

A file holds this rank's tensors (``input_ids``, ``vision_mask``, ``selected_rows``, optional
``position_ids``, the global ``cu_seqlens`` and ``vision_embed_count``) copied to the CPU, and
string metadata: the CP rank and size, the global ranks of the CP group, the step, each
tensor's original dtype/shape/device, and library versions. ``cpinspect analyze DIR`` reads them
back with :func:`read` and :func:`scan`.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

ENV_VAR = "CPINSPECT_CAPTURE"
FORMAT = "cpinspect-capture/1"
SUFFIX = ".safetensors"
_OFF = ("", "0", "false", "no", "off")

PathLike = Union[str, "os.PathLike[str]"]


class CaptureWarning(UserWarning):
    """A capture could not be written; the training step carries on without it."""


def is_enabled(enabled: bool | None = None) -> bool:
    """The ``enabled`` argument if given, else the ``CPINSPECT_CAPTURE`` environment variable (1/true/on)."""
    if enabled is not None:
        return bool(enabled)
    return os.environ.get(ENV_VAR, "").strip().lower() not in _OFF


def record(
    directory: PathLike,
    *,
    step: int,
    input_ids: Any,
    cu_seqlens: Any,
    vision_mask: Any,
    vision_embed_count: Any,
    selected_rows: Any,
    position_ids: Any = None,
    cp_group: Any = None,
    enabled: bool | None = None,
) -> Path | None:
    """Write this rank's view of ``step`` to ``directory``; return the file, or None when off or failed.

    ``input_ids``/``vision_mask``/``position_ids`` are this rank's local (pre-sharded) tensors,
    ``cu_seqlens`` the global physical boundaries, ``selected_rows`` the rows of the full
    vision embeddings this rank is about to scatter, ``vision_embed_count`` the encoder's row
    count (int or tensor). ``cp_group`` is the CP process group (default: the world group, or a
    single rank when torch.distributed is not initialised). CPU and CUDA tensors are accepted;
    the caller's tensors are only read.
    """
    if not is_enabled(enabled):
        return None
    try:
        return _write(Path(directory), int(step), cp_group, {
            "input_ids": input_ids, "cu_seqlens": cu_seqlens, "vision_mask": vision_mask,
            "selected_rows": selected_rows, "position_ids": position_ids,
        }, vision_embed_count)
    except Exception as exc:  # noqa: BLE001 - a capture must never break the training step
        warnings.warn(
            f"cpinspect capture of step {step} into {directory} failed ({type(exc).__name__}: {exc}); "
            "training continues without this file",
            CaptureWarning, stacklevel=2,
        )
        return None


def file_name(step: int, global_rank: int) -> str:
    """``step000012-rank00003.safetensors``: unique per process and step, sorted by step then rank."""
    return f"step{step:06d}-rank{global_rank:05d}{SUFFIX}"


def _write(directory: Path, step: int, cp_group: Any, tensors: dict[str, Any], embed_count: Any) -> Path:
    import torch
    from safetensors.torch import save

    group = _group_facts(cp_group)
    present = {name: t for name, t in tensors.items() if t is not None}
    stored = {name: _cpu_copy(torch.as_tensor(t)) for name, t in present.items()}
    stored["vision_embed_count"] = torch.tensor([int(embed_count)], dtype=torch.long)
    originals = {name: _describe(torch.as_tensor(t)) for name, t in present.items()}
    metadata = {
        "format": FORMAT,
        "step": str(step),
        **{key: value if isinstance(value, str) else json.dumps(value) for key, value in group.items()},
        "tensors": json.dumps(originals),
        "versions": json.dumps(versions(any(d["device"].startswith("cuda") for d in originals.values()))),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / file_name(step, group["global_rank"])
    _atomic_write(target, save(stored, metadata=metadata))
    return target


def _cpu_copy(tensor: Any) -> Any:
    """A private contiguous CPU copy (a CUDA tensor is copied device-to-host, which synchronises)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def _describe(tensor: Any) -> dict[str, Any]:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
            "device": str(tensor.device)}


def _group_facts(cp_group: Any) -> dict[str, Any]:
    """CP rank and size, the CP group's global ranks, and this process's global rank and world size."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    group = cp_group if cp_group is not None else (dist.group.WORLD if initialised else None)
    if group is None:
        return {"cp_rank": 0, "cp_size": 1, "group_ranks": [0], "global_rank": 0, "world_size": 1,
                "backend": "none"}
    cp_rank, cp_size = int(group.rank()), int(group.size())
    try:
        ranks = [int(r) for r in dist.get_process_group_ranks(group)]
    except Exception:  # noqa: BLE001 - a group torch does not know (e.g. a simulated one)
        ranks = list(range(cp_size))
    backend = _backend_name(group)
    global_rank = int(dist.get_rank()) if initialised else ranks[cp_rank]
    world_size = int(dist.get_world_size()) if initialised else cp_size
    return {"cp_rank": cp_rank, "cp_size": cp_size, "group_ranks": ranks, "global_rank": global_rank,
            "world_size": world_size, "backend": backend}


def _backend_name(group: Any) -> str:
    import torch.distributed as dist

    try:
        return str(dist.get_backend(group))
    except Exception:  # noqa: BLE001 - a group torch does not know: ask the group itself
        name = getattr(group, "getBackendName", None)
        return str(name()) if callable(name) else "unknown"


@functools.lru_cache(maxsize=2)
def versions(cuda: bool = False) -> dict[str, str | None]:
    """Versions that explain a capture later: cpinspect, torch, CUDA/NCCL (when used), Python, safetensors."""
    import safetensors
    import torch

    import cpinspect

    found: dict[str, str | None] = {
        "cpinspect": cpinspect.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "safetensors": getattr(safetensors, "__version__", None), "cuda": torch.version.cuda,
    }
    if cuda:
        found["gpu"] = torch.cuda.get_device_name()
        try:
            found["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 - a build without NCCL
            found["nccl"] = None
    return found


def _atomic_write(target: Path, data: bytes) -> None:
    """Write next to ``target`` under a private name, then rename: readers see all of it or nothing."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@dataclass
class CapturedRank:
    """One capture file read back: its tensors (CPU) and metadata."""

    path: Path
    step: int
    cp_rank: int
    cp_size: int
    group_ranks: tuple[int, ...]
    global_rank: int
    tensors: dict[str, Any]
    metadata: dict[str, str]

    @property
    def vision_embed_count(self) -> int:
        return int(self.tensors["vision_embed_count"].reshape(-1)[0])


def read(path: PathLike) -> CapturedRank:
    """Read one capture file; one that is not a cpinspect capture is an :class:`~cpinspect.core.errors.InputError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cpinspect.core.errors import InputError
    from cpinspect.core.files import check_declared_sizes

    path = Path(path)
    check_declared_sizes(path)  # a capture is read whole: its header's sizes are checked first, like a batch's
    try:
        tensors = load_file(str(path))
        metadata = _metadata(path)
        return CapturedRank(
            path=path, step=int(metadata["step"]), cp_rank=int(metadata["cp_rank"]), cp_size=int(metadata["cp_size"]),
            group_ranks=tuple(int(r) for r in json.loads(metadata["group_ranks"])),
            global_rank=int(metadata["global_rank"]), tensors=tensors, metadata=metadata,
        )
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(
            f"{path.name} is not a readable cpinspect capture ({type(exc).__name__}: {exc})",
            where=str(path),
            fix="capture files are written by cpinspect.jobs.capture.record; remove the file or re-run the capture",
        ) from None


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if metadata.get("format") != FORMAT:
        raise ValueError(f"metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    return metadata


def scan(directory: PathLike) -> list[Path]:
    """Capture files in ``directory`` (temporary files of writes in progress are skipped), sorted."""
    return sorted(p for p in Path(directory).glob(f"step*-rank*{SUFFIX}") if p.is_file())
