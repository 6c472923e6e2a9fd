"""Capture without editing model code: context managers that wrap a model's ``forward``.

    with capture_hf(model, "captures/", cp_group=cp_group, cu_seqlens=cu):
        model(input_ids=local_ids, pixel_values=..., image_grid_thw=...)

Each call of the wrapped ``forward`` records, through :func:`cpinspect.jobs.capture.record`, what
this rank received: its local ``input_ids``, the vision mask (the config's image/video token ids),
the encoder's row count (``image_grid_thw``/``video_grid_thw`` over ``merge**2``), the global
``cu_seqlens`` and the rows the model scatters. Then the original ``forward`` runs, unchanged;
leaving the block restores it. Capture follows :func:`capture.is_enabled` and never raises.

* :func:`capture_hf`: Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL (``model.forward(input_ids=...,
  attention_mask=..., position_ids=..., pixel_values=..., image_grid_thw=...)``). An unmodified HF model
  scatters the *first* rows of the image embeddings into the local placeholders (``masked_scatter``),
  so ``selected_rows`` defaults to ``0..n-1`` for ``n`` local vision tokens: under CP that is what it
  does, and ``cpinspect analyze`` then shows whether it matches the oracle.
* :func:`capture_bridge`: a Megatron-Bridge style ``Qwen3VLModel.forward(input_ids, ...,
  packed_seq_params=..., pixel_values=..., image_grid_thw=...)``; ``cu_seqlens`` come from
  ``packed_seq_params`` (``cu_seqlens_q_padded``, else ``cu_seqlens_q``). Bridge selects its rows
  inside the model, which a wrapper cannot see, so ``selected_rows=fn(call) -> rows`` is required (your
  selection function applied to the forward's arguments); no rows are ever guessed.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cpinspect.jobs import capture

IMAGE_PAD, VIDEO_PAD = 151655, 151656
Rows = Callable[[dict[str, Any]], Any]


@contextmanager
def capture_hf(model: Any, directory: str | Path, *, cp_group: Any = None, cu_seqlens: Any = None,
               selected_rows: Rows | None = None, first_step: int = 0,
               enabled: bool | None = None) -> Iterator[list[Path]]:
    """Wrap a Hugging Face Qwen-VL ``model.forward``; yields the list of files written so far."""
    config = getattr(model, "config", None)
    image_id = int(getattr(config, "image_token_id", None) or IMAGE_PAD)
    video_id = int(getattr(config, "video_token_id", None) or VIDEO_PAD)
    merge = int(getattr(getattr(config, "vision_config", None), "spatial_merge_size", 2) or 2)

    def facts(call: dict[str, Any]) -> dict[str, Any] | None:
        import torch

        ids = call.get("input_ids")
        if ids is None:
            return None
        ids = torch.as_tensor(ids).reshape(-1)
        cu = call.get("cu_seq_lens_q", cu_seqlens)
        if cu is None:
            cu = torch.tensor([0, ids.numel() * _cp_size(cp_group)])
        return _step_facts(call, ids, cu, (image_id, video_id), merge, selected_rows)

    with _wrapped(model, directory, facts, cp_group=cp_group, first_step=first_step, enabled=enabled) as files:
        yield files


@contextmanager
def capture_bridge(model: Any, directory: str | Path, *, selected_rows: Rows, cp_group: Any = None,
                   image_token_id: int = IMAGE_PAD, video_token_id: int = VIDEO_PAD, spatial_merge_size: int = 2,
                   first_step: int = 0, enabled: bool | None = None) -> Iterator[list[Path]]:
    """Wrap a Megatron-Bridge style ``Qwen3VLModel.forward``; yields the list of files written so far."""

    def facts(call: dict[str, Any]) -> dict[str, Any] | None:
        import torch

        ids, psp = call.get("input_ids"), call.get("packed_seq_params")
        if ids is None or psp is None:
            return None
        cu = getattr(psp, "cu_seqlens_q_padded", None)
        cu = cu if cu is not None else getattr(psp, "cu_seqlens_q", None)
        if cu is None:
            return None
        return _step_facts(call, torch.as_tensor(ids).reshape(-1), cu, (image_token_id, video_token_id),
                           spatial_merge_size, selected_rows)

    with _wrapped(model, directory, facts, cp_group=cp_group, first_step=first_step, enabled=enabled) as files:
        yield files


@contextmanager
def _wrapped(model: Any, directory: str | Path, facts: Callable[[dict[str, Any]], dict[str, Any] | None], *,
             cp_group: Any, first_step: int, enabled: bool | None) -> Iterator[list[Path]]:
    original = model.forward
    signature = inspect.signature(original)
    steps = itertools.count(first_step)
    files: list[Path] = []

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if capture.is_enabled(enabled):
            step = next(steps)
            try:
                bound = signature.bind_partial(*args, **kwargs)
                call = {k: v for k, v in bound.arguments.items() if k != "kwargs"}
                call.update(bound.arguments.get("kwargs", {}))
                found = facts(call)
            except Exception:  # noqa: BLE001 - a capture must never break the step
                found = None
            if found is not None:
                path = capture.record(directory, step=step, cp_group=cp_group, enabled=True, **found)
                if path is not None:
                    files.append(path)
        return original(*args, **kwargs)

    model.forward = forward
    try:
        yield files
    finally:
        if vars(model).get("forward") is forward:
            del model.forward  # the class's forward shows through again
        if model.forward != original:
            model.forward = original


def _step_facts(call: dict[str, Any], ids: Any, cu: Any, vision_ids: tuple[int, int], merge: int,
                selected_rows: Rows | None) -> dict[str, Any]:
    """What one captured step records: the local row, its mask, cu_seqlens, rows and the encoder's count.

    Without ``selected_rows`` the rows are ``0..n-1`` (a full, unsharded row selects every vision row).
    """
    import torch

    mask = (ids == vision_ids[0]) | (ids == vision_ids[1])
    rows = selected_rows(call) if selected_rows else torch.arange(int(mask.sum()))
    return {"input_ids": ids.view(1, -1), "cu_seqlens": torch.as_tensor(cu), "vision_mask": mask,
            "selected_rows": rows, "position_ids": call.get("position_ids"),
            "vision_embed_count": _embed_count(call, merge)}


def _embed_count(call: dict[str, Any], merge: int) -> int:
    import torch

    total = 0
    for key in ("image_grid_thw", "video_grid_thw"):
        grid = call.get(key)
        if grid is not None:
            total += int(torch.as_tensor(grid).reshape(-1, 3).prod(dim=1).sum()) // (merge * merge)
    return total


def _cp_size(group: Any) -> int:
    if group is not None:
        return int(group.size())
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
