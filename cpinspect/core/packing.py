"""Padded and flattened batches made into one packed THD row, the way the stacks pack them.

* Hugging Face padded: ``input_ids`` ``[B, T]`` with ``attention_mask`` (right or left padding).
  Padding is removed, each sample's valid tokens become one segment, and each segment is padded
  to a multiple of ``align`` (``2·cp``, or ``2·cp·tp``, as Megatron-Bridge ``preprocess_packed_seqs``
  aligns; pad id 0). Both boundaries are kept: ``cu_seqlens`` (logical) and ``cu_seqlens_padded``
  (physical). ``position_ids`` ``[3, B, T]`` / ``[B, T]`` and a ``[B, T]`` vision mask are carried along.
* Hugging Face ``DataCollatorWithFlattening``: one row, no ``cu_seqlens``, ``position_ids``
  restarting at 0 mark each boundary.

Each returns the new raw entries and a :class:`Finding` (``PACKED_FROM_PADDED`` /
``PACKED_FROM_POSITION_IDS``, info) with the numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from cpinspect.core.errors import InputError
from cpinspect.core.findings import Finding

PAD_ID = 0
PAD_POSITION = 1  # what Hugging Face get_rope_index gives padding


@dataclass(frozen=True)
class Packed:
    """The packed row's entries (flat names), what was done (a finding) and the input form's name."""

    raw: dict[str, Any]
    finding: Finding
    form: str
    origins: dict[str, str] = dataclasses.field(default_factory=dict)


def padding_side(mask: torch.Tensor) -> str:
    """``"right"``, ``"left"``, ``"none"`` (all valid) or ``"mixed"`` for a ``[B, T]`` 0/1 mask."""
    m = mask.to(torch.int8)
    if bool(m.all()):
        return "none"
    if bool((m[:, 1:] <= m[:, :-1]).all()):
        return "right"
    if bool((m[:, 1:] >= m[:, :-1]).all()):
        return "left"
    return "mixed"


def pack_padded(ids: torch.Tensor, mask: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                vision_mask: torch.Tensor | None = None, align: int = 1, where: str = "attention_mask") -> Packed:
    """One THD row from ``[B, T]`` ids and their ``attention_mask`` (see the module docstring)."""
    if mask.shape != ids.shape:
        raise InputError(
            f"attention_mask has shape {list(mask.shape)} but input_ids has {list(ids.shape)}",
            where=where, fix="save the attention_mask the processor or collator returned with these input_ids",
        )
    if mask.is_floating_point() and bool(torch.isnan(mask).any()):
        raise InputError("attention_mask holds NaN", where=where, fix="store it as 0/1 integers or bool")
    valid = mask.to(torch.bool)
    lengths = valid.sum(dim=1)
    if bool((lengths == 0).any()):
        empty = int(torch.nonzero(lengths == 0)[0])
        raise InputError(f"attention_mask row {empty} has no valid token", where=f"{where}, row {empty}",
                         fix="drop empty samples before saving the batch")
    align = max(1, int(align))
    padded = (lengths + align - 1) // align * align
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    cu_padded = torch.cat([padded.new_zeros(1), padded.cumsum(0)]).to(torch.int32)
    total = int(cu_padded[-1])
    row = torch.full((total,), PAD_ID, dtype=torch.long)
    place = torch.cat([torch.arange(int(cu_padded[b]), int(cu_padded[b]) + int(lengths[b]))
                       for b in range(ids.shape[0])])
    row[place] = ids[valid].to(torch.long)
    raw: dict[str, Any] = {"input_ids": row, "cu_seqlens": cu, "cu_seqlens_padded": cu_padded}
    if position_ids is not None:
        raw["position_ids"] = _pack_positions(position_ids, valid, place, total)
    if vision_mask is not None and vision_mask.shape == ids.shape:
        flat = torch.zeros(total, dtype=torch.bool)
        flat[place] = vision_mask.to(torch.bool)[valid]
        raw["vision_mask"] = flat
    side = padding_side(mask)
    removed = int(ids.numel() - int(lengths.sum()))
    added = total - int(lengths.sum())
    message = (f"packed input_ids {list(ids.shape)} with attention_mask ({side} padding, {removed} pad tokens "
               f"removed) into one THD row of {total} tokens: {ids.shape[0]} segments of lengths "
               f"{lengths.tolist()}, each padded to a multiple of {align} ({added} pad tokens added): "
               f"cu_seqlens {cu.tolist()}, cu_seqlens_padded {cu_padded.tolist()}")
    hint = ("this is how Megatron-Bridge preprocess_packed_seqs packs a padded batch (align 2*cp, or 2*cp*tp with "
            "sequence parallelism)")
    return Packed(raw, Finding("PACKED_FROM_PADDED", "info", message, hint), f"Hugging Face padded ({side})")


def _pack_positions(position_ids: torch.Tensor, valid: torch.Tensor, place: torch.Tensor, total: int) -> torch.Tensor:
    batch, length = valid.shape
    if position_ids.dim() == 2 and tuple(position_ids.shape) == (batch, length):
        out = torch.full((total,), PAD_POSITION, dtype=torch.long)
        out[place] = position_ids.to(torch.long)[valid]
        return out
    if position_ids.dim() == 3 and tuple(position_ids.shape[1:]) == (batch, length):
        dims = position_ids.shape[0]
        out = torch.full((dims, total), PAD_POSITION, dtype=torch.long)
        out[:, place] = position_ids.to(torch.long)[:, valid]
        return out
    raise InputError(
        f"position_ids has shape {list(position_ids.shape)}; with input_ids [{batch}, {length}] it must be "
        f"[{batch}, {length}] or [3, {batch}, {length}]",
        where="position_ids", fix="save the position_ids the model received with these input_ids",
    )


def unflatten(ids: torch.Tensor, position_ids: torch.Tensor, *, where: str = "position_ids") -> Packed:
    """``cu_seqlens`` of a flattened row (``DataCollatorWithFlattening``): a boundary where positions restart at 0."""
    row = ids.reshape(-1).to(torch.long)
    pos = position_ids.to(torch.long)
    if pos.dim() == 3 and pos.shape[1] == 1:
        pos = pos[:, 0]
    if pos.dim() == 2 and pos.shape[0] == 1:
        pos = pos[0]
    if pos.shape[-1] != row.numel() or pos.dim() not in (1, 2):
        raise InputError(
            f"position_ids has shape {list(position_ids.shape)} but the row has {row.numel()} tokens",
            where=where, fix="position_ids must be [T], [1, T] or [3, 1, T] for a flattened row of T tokens",
        )
    zero = pos == 0 if pos.dim() == 1 else (pos == 0).all(dim=0)
    starts = torch.nonzero(zero).view(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        first = int(pos.reshape(-1)[0]) if pos.numel() else 0
        raise InputError(
            f"the row has no cu_seqlens and its position_ids do not start at 0 (first {first}), so they cannot "
            "mark the sequence boundaries",
            where=where,
            fix="save cu_seqlens, or the position_ids DataCollatorWithFlattening returned (0 at each sequence start)",
        )
    cu = torch.cat([starts, torch.tensor([row.numel()])]).to(torch.int32)
    lengths = (cu[1:] - cu[:-1]).tolist()
    raw: dict[str, Any] = {"input_ids": row, "cu_seqlens": cu}
    if pos.dim() == 2:  # [3, T] mRoPE positions are the model's; 1-D ones only marked the boundaries
        raw["position_ids"] = pos
    message = (f"the row has no cu_seqlens: {len(lengths)} sequence(s) found where position_ids restart at 0 "
               f"(lengths {lengths}; cu_seqlens {cu.tolist()})")
    hint = ("this is the Hugging Face DataCollatorWithFlattening form; segments are not padded "
            "(simulate --pad pads them to 2*cp as Megatron does)")
    return Packed(raw, Finding("PACKED_FROM_POSITION_IDS", "info", message, hint), "flattened (position_ids)")


def prepare(raw: dict[str, Any], keys: dict[str, str], *, align: int = 1,
            where: str = "<dict>") -> tuple[dict[str, Any], dict[str, str], Packed | None]:
    """``(raw, keys, packed)``: a padded or flattened source packed into a THD row, else unchanged (None).

    A source with any cu_seqlens is never repacked. The returned ``keys`` drop the mappings of the
    fields the packing produced (they now sit under their own names).
    """
    from cpinspect.core.batch import FIELD_ALIASES, PHYSICAL_CU_KEYS
    from cpinspect.core.nested import by_name, flatten

    leaves, _ = flatten(raw)

    def path_of(field: str, names: tuple[str, ...]) -> str | None:
        if field in keys:
            return keys[field] if leaves.get(keys[field]) is not None else None
        return next((p for p in (by_name(leaves, n) for n in names) if p), None)

    if "cu_seqlens" in keys or any(by_name(leaves, k) for k in PHYSICAL_CU_KEYS):
        return raw, keys, None
    ids_path = path_of("input_ids", FIELD_ALIASES["input_ids"])
    ids = leaves.get(ids_path) if ids_path else None
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.is_floating_point():
        return raw, keys, None
    mask_path = path_of("attention_mask", FIELD_ALIASES["attention_mask"])
    pos_path = path_of("position_ids", FIELD_ALIASES["position_ids"])
    vis_path = path_of("vision_mask", FIELD_ALIASES["vision_mask"])
    mask, pos = leaves.get(mask_path) if mask_path else None, leaves.get(pos_path) if pos_path else None
    used = {ids_path, mask_path, pos_path}
    if isinstance(mask, torch.Tensor) and ids.dim() == 2:
        vision = leaves.get(vis_path) if vis_path else None
        packed = pack_padded(ids, mask, position_ids=pos if isinstance(pos, torch.Tensor) else None,
                             vision_mask=vision if isinstance(vision, torch.Tensor) else None, align=align,
                             where=f"{where}, key {mask_path}")
        if "vision_mask" in packed.raw:
            used.add(vis_path)
    elif isinstance(pos, torch.Tensor) and (ids.dim() == 1 or ids.shape[0] == 1):
        packed = unflatten(ids, pos, where=f"{where}, key {pos_path}")
    else:
        return raw, keys, None
    if packed.finding.code == "PACKED_FROM_PADDED":
        origins = {"input_ids": f"{ids_path} (valid tokens by {mask_path})",
                   "cu_seqlens": f"{mask_path} (lengths padded to a multiple of {max(1, align)})",
                   "logical_cu_seqlens": f"{mask_path} (valid lengths)"}
    else:
        origins = {"input_ids": str(ids_path), "cu_seqlens": f"{pos_path} (restarts at 0)"}
    if pos_path and "position_ids" in packed.raw:
        origins["position_ids"] = pos_path
    if "vision_mask" in packed.raw and vis_path:
        origins["vision_mask"] = vis_path
    packed = dataclasses.replace(packed, origins=origins)
    rest = {p: v for p, v in leaves.items() if p not in used and p not in packed.raw}
    kept = {f: p for f, p in keys.items() if p not in used}
    return {**packed.raw, **rest}, kept, packed
