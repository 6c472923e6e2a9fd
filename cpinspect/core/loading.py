"""Loading a batch: pick the fields of what :mod:`cpinspect.core.files` read, validate them.

The one loader of cpinspect (simulate, info, layout, diagnose, analyze, ``check --batch``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from cpinspect.core.batch import (
    FIELD_ALIASES,
    FIELDS,
    LOGICAL_CU_KEYS,
    PADDED_CU_KEYS,
    PHYSICAL_CU_KEYS,
    BatchSource,
    FieldInfo,
    PackedBatch,
    check_grid_merge,
)
from cpinspect.core.errors import InputError
from cpinspect.core.files import Part, read_source, source_name
from cpinspect.core.findings import Finding
from cpinspect.core.layout import check_cu_seqlens
from cpinspect.core.nested import by_name, flatten
from cpinspect.core.packing import prepare

Stacked = Literal["refuse", "concatenate"]
SPATIAL_MERGE = 2  # TokenConfig.spatial_merge_size of every preset
VISION_ID_FLOOR = 151643  # the smallest Qwen-VL special token id; a dtype whose max is below it cannot hold them


def load_batch(source: BatchSource, *, keys: Mapping[str, str] | None = None,
               stacked: Stacked = "refuse", align: int = 1, max_bytes: int | None = None) -> PackedBatch:
    """Load a batch from a path (file or ``rank{r}`` directory), a dict, or a list of either.

    ``keys`` maps cpinspect field names (``input_ids``, ``cu_seqlens``, ...) to the names the
    source uses, for stacks with their own spelling (``--key input_ids=tokens_local``).
    ``stacked`` says what a stacked ``[B, T]`` id tensor (``B > 1``) becomes: an exit-2 error
    (``"refuse"``, BATCH_NOT_FLAT) or one row, concatenated in a copy (``"concatenate"``, for
    ``diagnose``, which reports it). ``found`` always records what the source held, as it was.
    """
    keys = dict(keys or {})
    for name in keys:
        if name not in FIELDS:
            raise InputError(
                f"--key names an unknown field {name!r}",
                where=f"--key {name}={keys[name]}",
                fix=f"map one of: {', '.join(FIELDS)}",
            )
    parts = read_source(source, max_bytes=max_bytes)
    found = [_found(raw) for _, raw in parts]
    containers = flatten(parts[0][1])[1]
    prepared = [prepare(raw, keys, align=align, where=name) for name, raw in parts]
    packed = prepared[0][2]
    parts = [(name, new) for (name, _), (new, _, _) in zip(parts, prepared)]
    keys = prepared[0][1]
    if stacked == "concatenate":
        parts = [(name, _flatten_ids(raw, keys)) for name, raw in parts]
    batch = _from_parts(parts, keys, source_name(source))
    batch.found = found
    batch.containers = containers
    if packed is not None:
        batch.keys.update({k: v for k, v in packed.origins.items() if k in batch.keys})
        batch.form = packed.form
        batch.notes.insert(0, packed.finding)
    return batch


def stacked_shape(batch: PackedBatch) -> tuple[int, int] | None:
    """``(B, S)`` when the source held ids as ``[B, S]`` with ``B > 1`` (loaded with ``stacked="concatenate"``)."""
    key = batch.keys.get("input_ids", "input_ids")
    for found in batch.found[:1]:
        for info in found:
            if info.key == key and len(info.shape) == 2 and info.shape[0] > 1:
                return int(info.shape[0]), int(info.shape[1])
    return None


def _flatten_ids(raw: dict[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    names = (keys["input_ids"],) if "input_ids" in keys else FIELD_ALIASES["input_ids"]
    key = next((k for k in names if k in raw), None)
    ids = raw.get(key) if key is not None else None
    if key is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] <= 1 \
            or ids.is_floating_point():
        return raw
    return {**raw, key: ids.reshape(1, -1)}


def _found(raw: Mapping[str, Any]) -> list[FieldInfo]:
    leaves, _ = flatten(raw)
    return [FieldInfo(k, tuple(v.shape) if isinstance(v, torch.Tensor) else (), _dtype_name(v))
            for k, v in leaves.items()]


def _from_parts(parts: list[Part], keys: Mapping[str, str], source: str) -> PackedBatch:
    fields = [_pick_fields(name, raw, keys) for name, raw in parts]
    first_name, first = parts[0][0], fields[0]
    rows = [_as_row(f["input_ids"], name, keys.get("input_ids", f.get("_input_ids_key", "input_ids")))
            for (name, _), f in zip(parts, fields)]
    cu = _checked_cu(_as_tensor(first["cu_seqlens"], first_name, first["_cu_key"]), first_name, first["_cu_key"])
    for (name, _), f in zip(parts[1:], fields[1:]):
        other = _checked_cu(_as_tensor(f["cu_seqlens"], name, f["_cu_key"]), name, f["_cu_key"])
        if other.shape != cu.shape or not torch.equal(other, cu):
            raise InputError(
                f"per-rank files disagree on {first['_cu_key']}: {_short(cu)} in {first_name} but "
                f"{_short(other)} in {name}",
                where=name,
                fix="every CP rank must carry the same global cu_seqlens; re-save the rank files from one step",
            )
    batch_notes = [n for n in (_dtype_note(f["input_ids"], name, f["_input_ids_key"])
                               for (name, _), f in zip(parts[:1], fields[:1])) if n]
    lengths = {row.numel() for row in rows}
    if len(lengths) > 1:
        sizes = ", ".join(f"rank {r}: {row.numel()}" for r, row in enumerate(rows))
        raise InputError(
            f"per-rank files hold local rows of different lengths ({sizes})",
            where=source,
            fix="zigzag gives every rank cu_seqlens[-1] / cp tokens; re-save the local rows from one step",
        )
    batch = PackedBatch(rows=rows, cu_seqlens=cu, source=source, notes=batch_notes)
    batch.keys = dict(first["_keys"])
    batch.extra = [{k: _own(v, name) for k, v in f["_leaves"].items()
                    if isinstance(v, torch.Tensor) and k not in f["_keys"].values()}
                   for (name, _), f in zip(parts, fields)]
    if first.get("logical_cu_seqlens") is not None:
        batch.logical_cu_seqlens = _checked_cu(
            _as_tensor(first["logical_cu_seqlens"], first_name, first["_keys"]["logical_cu_seqlens"]),
            first_name, first["_keys"]["logical_cu_seqlens"],
        )
        _check_logical(batch.logical_cu_seqlens, cu, first_name)
    for grid in ("image_grid_thw", "video_grid_thw"):
        if first.get(grid) is not None:
            setattr(batch, grid, _as_grid(first[grid], first_name, first["_keys"][grid]))
            # every Qwen-VL merges 2x2 patches: an odd h or w has no whole token count
            check_grid_merge(getattr(batch, grid), first["_keys"][grid], SPATIAL_MERGE,
                             where=f"{first_name}, key {first['_keys'][grid]}")
    if first.get("second_per_grid_ts") is not None:
        batch.second_per_grid_ts = _as_tensor(first["second_per_grid_ts"], first_name, "second_per_grid_ts").reshape(-1)
    if first.get("local_cp_size") is not None:
        batch.local_cp_size = _as_sizes(first["local_cp_size"], first_name, first["_keys"]["local_cp_size"])
    if first.get("vision_embed_count") is not None:
        batch.vision_embed_count = _as_count(first["vision_embed_count"], first_name)
    if all(f.get("vision_mask") is not None for f in fields):
        batch.vision_mask = [
            _as_mask(f["vision_mask"], name, row.numel()) for (name, _), f, row in zip(parts, fields, rows)
        ]
    if all(f.get("position_ids") is not None for f in fields):
        batch.position_ids = [
            _as_tensor(f["position_ids"], name, "position_ids") for (name, _), f in zip(parts, fields)
        ]
    return batch


def _pick_fields(name: str, raw: dict[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    """Resolve aliases and dotted paths: which path of ``raw`` (nested dicts/objects flattened) holds each field."""
    leaves, _ = flatten(raw)
    chosen: dict[str, str] = {}
    for field_name in FIELDS:
        if field_name not in keys:
            continue
        path = keys[field_name]
        if leaves.get(path) is None:
            raise InputError(
                f"--key maps {field_name} to {path!r}, but the batch has no such key or path "
                f"(paths: {', '.join(sorted(leaves)) or 'none'})",
                where=name,
                fix="check the spelling; nested fields take dotted paths "
                "(--key cu_seqlens=packed_seq_params.cu_seqlens_q)",
            )
        chosen[field_name] = path
    for field_name, aliases in FIELD_ALIASES.items():
        if field_name not in chosen:
            found = next((p for p in (by_name(leaves, a) for a in aliases) if p), None)
            if found:
                chosen[field_name] = found
    if "cu_seqlens" not in chosen:
        found = next((p for p in (by_name(leaves, k) for k in PHYSICAL_CU_KEYS) if p), None)
        if found:
            chosen["cu_seqlens"] = found
    if "logical_cu_seqlens" not in chosen and chosen.get("cu_seqlens", "").rsplit(".", 1)[-1] in PADDED_CU_KEYS:
        container = chosen["cu_seqlens"].rpartition(".")[0]
        found = next((p for p in (by_name(leaves, k, prefer=container) for k in LOGICAL_CU_KEYS) if p), None)
        if found:
            chosen["logical_cu_seqlens"] = found
    missing = [f for f in ("input_ids", "cu_seqlens") if f not in chosen]
    if missing:
        want = {
            "input_ids": "input_ids (or tokens)",
            "cu_seqlens": "cu_seqlens (or cu_seqlens_padded, cu_seqlens_q_padded, cu_seqlens_q)",
        }
        raise InputError(
            f"the batch has no {' and no '.join(want[m] for m in missing)} (keys found: "
            f"{', '.join(sorted(leaves)) or 'none'})",
            where=name,
            fix="save these keys, or map your names with --key input_ids=NAME / --key cu_seqlens=NAME "
            "(dotted paths reach nested fields: packed_seq_params.cu_seqlens_q)",
        )
    out: dict[str, Any] = {f: leaves[k] for f, k in chosen.items()}
    out["_keys"] = chosen
    out["_cu_key"] = chosen["cu_seqlens"]
    out["_input_ids_key"] = chosen["input_ids"]
    out["_leaves"] = leaves
    return out


def _dtype_name(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.")
    return type(value).__name__


def _dtype_note(value: Any, name: str, key: str) -> Finding | None:
    """A warning when the ids' dtype cannot hold Qwen-VL's vision token ids (int16 wraps 151655 to 20583)."""
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dtype == torch.bool:
        return None
    top = torch.iinfo(value.dtype).max
    if top >= VISION_ID_FLOOR:
        return None
    return Finding(
        "IDS_DTYPE_TOO_SMALL", "warning",
        f"{key} has dtype {str(value.dtype).removeprefix('torch.')} (at most {top:,}): Qwen-VL vision token ids "
        f"(151655 image_pad, 151656 video_pad) do not fit, so they wrapped when the ids were cast and no "
        f"vision token can be found ({name})",
        "save token ids as int64 (input_ids.long()) before the cast that wrapped them",
    )


def _checked_cu(cu: torch.Tensor, name: str, key: str) -> torch.Tensor:
    """``check_cu_seqlens`` with the file named in ``Where``."""
    try:
        return check_cu_seqlens(cu, name=key)
    except InputError as exc:
        raise InputError(exc.what, where=f"{name}, key {exc.where or key}", fix=exc.fix) from None


def _own(value: torch.Tensor, name: str) -> torch.Tensor:
    """A CPU tensor the batch owns: a file's tensors are already ours (no copy); a caller's dict is copied."""
    value = value.detach().to("cpu")
    return value.clone() if name.startswith("<") else value


def _as_tensor(value: Any, name: str, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return _own(value, name)
    if isinstance(value, (list, tuple, int)):
        try:
            return torch.tensor(value)
        except (TypeError, ValueError):
            pass
    raise InputError(
        f"{key} is a {type(value).__name__}, not a tensor",
        where=f"{name}, key {key}",
        fix="store it as a torch tensor",
    )


def _as_row(value: Any, name: str, key: str) -> torch.Tensor:
    ids = _as_tensor(value, name, key)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(
            f"{key} has dtype {ids.dtype}, but token ids must be integers",
            where=f"{name}, key {key}",
            fix="store token ids as int64 (input_ids.long())",
        )
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    elif ids.dim() == 2 and ids.shape[1] == 1:
        raise InputError(
            f"{key} has shape {list(ids.shape)}: {ids.shape[0]} rows of one token each (a column), but a packed "
            "THD batch is one flat row [1, T]",
            where=f"{name}, key {key}",
            fix="save the row as [1, T] or [T] (input_ids.reshape(1, -1)); a column usually means a transposed row",
        )
    elif ids.dim() == 2:
        raise InputError(
            f"{key} has shape {list(ids.shape)}: batch dimension {ids.shape[0]} > 1, but a packed THD batch is "
            "one flat row [1, T] (BATCH_NOT_FLAT)",
            where=f"{name}, key {key}",
            fix="pack the samples into one row and describe them with cu_seqlens, or pass one row per file",
        )
    elif ids.dim() != 1:
        raise InputError(
            f"{key} has {ids.dim()} dimensions (shape {list(ids.shape)}); expected [T] or [1, T]",
            where=f"{name}, key {key}",
            fix="pass the packed token row, not embeddings or a stacked batch",
        )
    ids = ids.to(torch.long)
    if ids.numel() and int(ids.min()) < 0:
        where = int(torch.nonzero(ids < 0)[0])
        raise InputError(
            f"{key} holds a negative token id ({int(ids[where])} at position {where})",
            where=f"{name}, key {key}, position {where}",
            fix="ids must be vocabulary indices; replace ignore-index values (-100) belong in labels, not input_ids",
        )
    return ids


def _as_grid(value: Any, name: str, key: str) -> torch.Tensor:
    grid = _as_tensor(value, name, key)
    if grid.numel() == 0:
        return grid.reshape(0, 3).to(torch.long)
    if grid.is_floating_point() or grid.dim() != 2 or grid.shape[1] != 3:
        raise InputError(
            f"{key} has shape {list(grid.shape)} and dtype {grid.dtype}; expected integer [N, 3] rows of (t, h, w)",
            where=f"{name}, key {key}",
            fix="store one (t, h, w) row per image or video, as the processor returns it",
        )
    grid = grid.to(torch.long)
    bad = torch.nonzero((grid <= 0).any(dim=1))
    if bad.numel():
        item = int(bad[0])
        axis = int(torch.nonzero(grid[item] <= 0)[0])
        value = int(grid[item, axis])
        problem = "is 0 (an empty item)" if value == 0 else f"is negative ({value})"
        raise InputError(
            f"{key} row {item} is {grid[item].tolist()}: {'thw'[axis]} {problem}, but every t, h, w must be positive",
            where=f"{name}, key {key}, row {item}",
            fix="drop empty items or fix the processor output",
        )
    return grid


def _as_mask(value: Any, name: str, length: int) -> torch.Tensor:
    mask = _as_tensor(value, name, "vision_mask").reshape(-1)
    if mask.is_floating_point() and bool(torch.isnan(mask).any()):
        where = int(torch.nonzero(torch.isnan(mask))[0])
        raise InputError(
            f"vision_mask is {str(mask.dtype).removeprefix('torch.')} and holds NaN "
            f"({int(torch.isnan(mask).sum())} entries, first at position {where}); NaN would read as True",
            where=f"{name}, key vision_mask, position {where}",
            fix="store the mask as bool (input_ids == image_token_id); a float mask must hold only 0 and 1",
        )
    if mask.numel() != length:
        raise InputError(
            f"vision_mask has {mask.numel()} entries but input_ids has {length}",
            where=f"{name}, key vision_mask",
            fix="the mask must cover the same (local) row as input_ids",
        )
    return mask.to(torch.bool)


def _as_count(value: Any, name: str) -> int:
    tensor = _as_tensor(value, name, "vision_embed_count")
    if tensor.numel() != 1 or tensor.is_floating_point() or int(tensor.reshape(-1)[0]) < 0:
        raise InputError(
            f"vision_embed_count must be one non-negative integer, got {tensor.tolist()}",
            where=f"{name}, key vision_embed_count",
            fix="store the number of rows of the vision encoder's output",
        )
    return int(tensor.reshape(-1)[0])


def _as_sizes(value: Any, name: str, key: str) -> torch.Tensor:
    """``local_cp_size`` as a 1-D int64 tensor of positive sizes (one for the micro-batch, or one per segment)."""
    tensor = _as_tensor(value, name, key).reshape(-1)
    if tensor.is_floating_point() or tensor.dtype == torch.bool or not tensor.numel() or bool((tensor < 1).any()):
        raise InputError(f"{key} must hold positive whole CP sizes (one, or one per segment), got {tensor.tolist()}",
                         where=f"{name}, key {key}", fix="save the local CP size of the micro-batch or of each segment")
    return tensor.to(torch.long)


def _check_logical(logical: torch.Tensor, physical: torch.Tensor, name: str) -> None:
    if logical.shape != physical.shape:
        raise InputError(
            f"logical cu_seqlens has {logical.numel()} entries but physical has {physical.numel()}",
            where=name,
            fix="both must describe the same segments",
        )
    longer = torch.nonzero((logical[1:] - logical[:-1]) > (physical[1:] - physical[:-1]))
    if longer.numel():
        seg = int(longer[0])
        raise InputError(
            f"segment {seg} is longer logically ({int(logical[seg + 1] - logical[seg])}) than physically "
            f"({int(physical[seg + 1] - physical[seg])})",
            where=f"{name}, segment {seg}",
            fix="the padded (physical) boundaries must contain the real (logical) lengths; are the two swapped?",
        )


def _short(t: torch.Tensor, limit: int = 8) -> str:
    values = t.tolist()
    if len(values) <= limit:
        return str(values)
    head = ", ".join(map(str, values[: limit // 2]))
    tail = ", ".join(map(str, values[-limit // 2 :]))
    return f"[{head}, ..., {tail}] ({len(values)} entries)"
