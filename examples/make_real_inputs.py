"""Regenerate examples/real/: one batch per input form a stack hands the model.

    python examples/make_real_inputs.py

* ``bridge_psp_padded.pt``: Megatron-Bridge dict, ``input_ids`` ``[1, T]`` + a ``PackedSeqParams``
  dataclass object (``cu_seqlens_q`` logical, ``cu_seqlens_q_padded`` physical, segments padded to 24).
* ``bridge_psp_unpadded.pt``: the same with ``cu_seqlens_q_padded=None`` (``cu_seqlens_q`` is physical).
* ``hf_padded_right.pt`` / ``hf_padded_left.pt``: a Hugging Face Qwen2-VL batch, ``input_ids`` ``[B, T]`` +
  ``attention_mask`` + ``pixel_values`` + ``image_grid_thw`` from the real ``transformers`` image processor.
* ``hf_flattened.pt``: ``DataCollatorWithFlattening`` form with Qwen3-VL's processor (patch 16): one row,
  ``position_ids`` restarting at 0 at each sequence.
* ``verl_nested.pt``: verl-style nesting (``batch.*``, ``multi_modal_inputs.*``).
* ``valid_only.pt``: a valid-tokens-only row under padded ``cu_seqlens_padded`` (VALID_ONLY_ROW).

The processors are built from their default config (no download); the tokenizer cannot be
downloaded, so placeholders are expanded the way the processor does: ``grid.prod() // merge**2``
image_pad tokens between vision_start and vision_end. ``samples()`` is the plain-list description
the tests build the equivalent THD row from.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "real"
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
PAD_TO = 24  # a multiple of 2*cp for cp 2, 3 and 4
PSP_MODULE = "megatron.core.packed_seq_params"


@dataclasses.dataclass
class PackedSeqParams:
    """The fields of Megatron-Core's PackedSeqParams (saved under its module name, loaded without it)."""

    qkv_format: str = "thd"
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_kv: torch.Tensor | None = None
    cu_seqlens_q_padded: torch.Tensor | None = None
    cu_seqlens_kv_padded: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_kv: int | None = None
    local_cp_size: int | None = None


PackedSeqParams.__module__ = PSP_MODULE


def _text(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(1000, 50000, n).tolist()


def _sample(rng: np.random.Generator, before: int, image_tokens: list[int], after: int) -> list[int]:
    out = _text(rng, before)
    for n in image_tokens:
        out += [VISION_START] + [IMAGE_PAD] * n + [VISION_END] + _text(rng, 3)
    return out + _text(rng, after)


def samples(seed: int = 0) -> list[list[int]]:
    """Three samples (token lists) with 6, 6 and 4 image tokens: the HF images' grids (1,4,6), (1,6,4), (1,4,4)."""
    rng = np.random.default_rng(seed)
    return [_sample(rng, 5, [6], 7), _sample(rng, 2, [6, 4], 4), _sample(rng, 9, [], 3)]


def _images(patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2)
    rng = np.random.default_rng(7)
    sides = [(4, 6), (6, 4), (4, 4)]
    images = [(rng.random((h * patch, w * patch, 3)) * 255).astype(np.uint8) for h, w in sides]
    out = processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _packed(seqs: list[list[int]], multiple: int) -> tuple[list[int], list[int], list[int]]:
    row, cu, cu_padded = [], [0], [0]
    for seq in seqs:
        padded = -(-len(seq) // multiple) * multiple
        row += seq + [0] * (padded - len(seq))
        cu.append(cu[-1] + len(seq))
        cu_padded.append(cu_padded[-1] + padded)
    return row, cu, cu_padded


def _padded_2d(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, seq in enumerate(seqs):
        sl = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[b, sl] = torch.tensor(seq)
        mask[b, sl] = 1
    return ids, mask


def example_files(hf: bool = True) -> dict[str, dict[str, Any]]:
    """Every example's saved dict by file name (``hf=False`` skips the processor-built ones)."""
    seqs = samples()
    grid = torch.tensor([[1, 4, 6], [1, 6, 4], [1, 4, 4]])
    row, cu, cu_padded = _packed(seqs, PAD_TO)
    t = torch.tensor
    files: dict[str, dict[str, Any]] = {
        "bridge_psp_padded.pt": {
            "input_ids": t(row).view(1, -1), "image_grid_thw": grid,
            "packed_seq_params": PackedSeqParams(cu_seqlens_q=t(cu, dtype=torch.int32),
                                                 cu_seqlens_kv=t(cu, dtype=torch.int32),
                                                 cu_seqlens_q_padded=t(cu_padded, dtype=torch.int32),
                                                 cu_seqlens_kv_padded=t(cu_padded, dtype=torch.int32),
                                                 max_seqlen_q=max(b - a for a, b in zip(cu_padded, cu_padded[1:])),
                                                 local_cp_size=None)},
        "bridge_psp_unpadded.pt": {
            "input_ids": t(row).view(1, -1), "image_grid_thw": grid,
            "packed_seq_params": PackedSeqParams(cu_seqlens_q=t(cu_padded, dtype=torch.int32),
                                                 cu_seqlens_kv=t(cu_padded, dtype=torch.int32))},
        "verl_nested.pt": {
            "batch": {"input_ids": t(row).view(1, -1), "attention_mask": torch.ones(1, len(row), dtype=torch.long)},
            "multi_modal_inputs": {"image_grid_thw": grid},
            "cu_seqlens": t(cu_padded, dtype=torch.int32)},
        "valid_only.pt": {
            "input_ids": t([tok for seq in seqs for tok in seq]).view(1, -1), "image_grid_thw": grid,
            "cu_seqlens": t(cu, dtype=torch.int32), "cu_seqlens_padded": t(cu_padded, dtype=torch.int32)},
    }
    if hf:
        pixels, hf_grid = _images(14)
        for side in ("right", "left"):
            ids, mask = _padded_2d(seqs, side)
            files[f"hf_padded_{side}.pt"] = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
                                             "image_grid_thw": hf_grid}
        pixels3, grid3 = _images(16)
        flat, _, bounds = _packed(seqs, PAD_TO)  # flattening does not pad: the text is chosen to fill 24s
        filled = [flat[a:b] for a, b in zip(bounds, bounds[1:])]
        filled = [[tok if tok else 1000 + i for i, tok in enumerate(seq)] for seq in filled]
        position_ids = torch.cat([torch.arange(len(seq)) for seq in filled]).view(1, -1)
        files["hf_flattened.pt"] = {"input_ids": t([x for seq in filled for x in seq]).view(1, -1),
                                    "position_ids": position_ids, "pixel_values": pixels3, "image_grid_thw": grid3}
    return files


def save_all(out: Path = OUT, hf: bool = True) -> list[Path]:
    """Write every example under ``out`` (the PackedSeqParams module exists only while saving)."""
    out.mkdir(parents=True, exist_ok=True)
    parts = PSP_MODULE.split(".")
    added = [".".join(parts[: i + 1]) for i in range(len(parts)) if ".".join(parts[: i + 1]) not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[PSP_MODULE].PackedSeqParams = PackedSeqParams  # type: ignore[attr-defined]
    try:
        written = []
        for name, data in example_files(hf).items():
            torch.save(data, out / name)
            written.append(out / name)
        return written
    finally:
        for name in added:
            sys.modules.pop(name, None)


if __name__ == "__main__":
    for path in save_all():
        print(path)
