"""Regenerate ``examples/broken/``: one small batch per diagnose finding code, with the error it produces.

    python examples/make_broken.py            # writes examples/broken/ next to this file
    python examples/make_broken.py --out DIR  # writes elsewhere

Each case directory holds the batch (``batch.pt``, or ``rank{r}.pt`` for pre-sharded input), the
error text the failing run printed (``error.txt`` or a ``train.log``), and ``case.json``: the
finding code ``cpinspect diagnose`` must confirm, the cp, the command-line arguments and the
public issue the case reproduces. Deterministic: tests compare the committed files with this
script's output and run the diagnosis of every case.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402

from cpinspect.core.layout import make_layout  # noqa: E402
from cpinspect.core.synth import build_batch, demo_batch_dict, shard_batch, write_files  # noqa: E402
from cpinspect.core.tokens import token_config  # noqa: E402

HERE = Path(__file__).resolve().parent
Content = Union[dict[str, torch.Tensor], str]
IMAGE_38x50 = ("image", (1, 38, 50))  # 38·50/4 = 475 tokens: a 532x700 px image at patch 14


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_batch(segments: Sequence[Sequence[tuple[str, Any]]], multiple: int, model: str,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """A full row whose segments are padded to ``multiple`` (what Megatron frameworks do before CP)."""
    tokens = token_config(model)
    logical = build_batch(segments, tokens=tokens, seed=seed)["cu_seqlens"]
    lengths = (logical[1:] - logical[:-1]).tolist()
    return build_batch(segments, [_pad(n, multiple) for n in lengths], tokens=tokens, seed=seed)


def _case(code: str, cp: int, source: str, story: str, error_file: str = "error.txt",
          args: Sequence[str] = ()) -> str:
    return json.dumps({"code": code, "cp": cp, "error_file": error_file, "args": list(args), "reproduces": source,
                       "story": story}, indent=2) + "\n"


def _held(batch: dict[str, torch.Tensor], cp: int, layout: str, token_id: int) -> list[int]:
    """Vision tokens each rank holds (used only to write the error texts the cases print)."""
    cu = batch.get("cu_seqlens_padded", batch["cu_seqlens"]).to(torch.long)
    plan = make_layout(cu, cp, layout)
    return (batch["input_ids"].reshape(-1) == token_id)[plan.all_global_indices()].sum(dim=1).tolist()


def presharded_rows_not_selected() -> dict[str, Content]:
    """THUDM/slime#1379: tokens CP-sliced before the model, the tower encodes every image."""
    segments = [
        [("text", 12), IMAGE_38x50, ("text", 300), IMAGE_38x50, ("text", 9)],
        [("text", 20), IMAGE_38x50, IMAGE_38x50, ("text", 640), IMAGE_38x50, ("text", 14)],
        [("text", 31), IMAGE_38x50, ("text", 420), IMAGE_38x50, ("text", 6)],
        [("text", 1332), IMAGE_38x50, ("text", 40), IMAGE_38x50, ("text", 18)],
        [("text", 25), IMAGE_38x50, ("text", 700), IMAGE_38x50, IMAGE_38x50, ("text", 10)],
        [("text", 8), IMAGE_38x50, ("text", 33)],
    ]
    full = _padded_batch(segments, 4, "qwen2.5-vl", seed=1379)
    held = _held(full, 2, "zigzag", token_config("qwen2.5-vl").image_token_id)
    assert held == [4001, 2174], held
    files: dict[str, Content] = {f"rank{r}.pt": shard for r, shard in enumerate(shard_batch(full, 2))}
    files["train.log"] = (
        "[rank0]: step 12 | loss 1.734 | grad_norm 0.91\n"
        "[rank0]: Traceback (most recent call last):\n"
        "[rank0]: ValueError: Image features and image tokens do not match: tokens: 4001, features 6175\n"
        "[rank1]: Traceback (most recent call last):\n"
        "[rank1]:   File \"modeling_qwen2_5_vl.py\", in forward\n"
        "[rank1]: ValueError: Image features and image tokens do not match: tokens: 2174, features 6175\n"
        "E1126 04:12:55 torch/distributed/elastic/multiprocessing/api.py failed (exitcode: 1)\n"
    )
    files["case.json"] = _case(
        "PRESHARDED_ROWS_NOT_SELECTED", 2, "THUDM/slime#1379",
        "Qwen2.5-VL with --context-parallel-size 2: the tokens were CP-sliced before the model, so the placeholder "
        "mask counts rank 1's 2174 image tokens while the tower encodes all 13 images (6175 rows)",
        error_file="train.log", args=["--model", "qwen2.5-vl", "--rank", "1"])
    return files


def truncated_vision_span() -> dict[str, Content]:
    """hiyouga/LlamaFactory#7590/#6425/#5964: cutoff_len cuts a video span, the grid stays whole."""
    tokens = token_config("qwen2-vl")
    whole = build_batch([[("text", 20), ("video", (4, 16, 16)), ("text", 30)],
                         [("text", 10), ("image", (1, 8, 8)), ("text", 20)]], tokens=tokens, seed=7590)
    ids, cu = whole["input_ids"].reshape(-1), whole["cu_seqlens"]
    cutoff = 160
    row = torch.cat([ids[:cutoff], ids[int(cu[1]):]]).view(1, -1)
    lengths = torch.tensor([0, cutoff, cutoff + int(cu[2] - cu[1])], dtype=torch.int32)
    batch = {"input_ids": row, "cu_seqlens": lengths, "image_grid_thw": whole["image_grid_thw"],
             "video_grid_thw": whole["video_grid_thw"]}
    video_tokens = int((row == tokens.video_token_id).sum())
    return {
        "batch.pt": batch,
        "error.txt": f"ValueError: Video features and video tokens do not match: tokens: {video_tokens}, "
                     "features 256\n",
        "case.json": _case("TRUNCATED_VISION_SPAN", 1, "hiyouga/LlamaFactory#7590, #6425, #5964",
                           "cutoff_len 160 cuts a 4x16x16 video (256 tokens) after 139 placeholders; the grid and "
                           "pixel_values stay whole, so the encoder makes 256 rows",
                           args=["--model", "qwen2-vl"]),
    }


def _two_images_per_segment() -> dict[str, torch.Tensor]:
    segments = [
        [("text", 6), ("image", (1, 8, 16)), ("text", 90), ("image", (1, 8, 8)), ("text", 27)],
        [("text", 50), ("image", (1, 16, 16)), ("text", 10)],
        [("text", 3), ("image", (1, 8, 8)), ("text", 70)],
    ]
    return _padded_batch(segments, 8, "qwen3-vl", seed=1368)


def layout_mismatch() -> dict[str, Content]:
    """Reference §1.6: per-document zigzag mask, rows cut per sequence (the whole row as one sequence)."""
    segments = [
        [("text", 6), ("image", (1, 8, 16)), ("text", 90), ("image", (1, 8, 8)), ("text", 27)],
        [("text", 50), ("image", (1, 16, 16)), ("text", 10)],
        [("text", 3), ("image", (1, 8, 8)), ("text", 70)],
        [("text", 12), ("image", (1, 16, 8)), ("text", 40)],
    ]
    batch = _padded_batch(segments, 8, "qwen3-vl", seed=1368)
    image = token_config("qwen3-vl").image_token_id
    mask_held, row_held = _held(batch, 2, "zigzag", image), _held(batch, 2, "sequence-zigzag", image)
    return {
        "batch.pt": batch,
        "error.txt": f"[rank0]: RuntimeError: shape mismatch: value tensor of shape [{row_held[0]}, 4096] cannot be "
                     f"broadcast to indexing result of shape [{mask_held[0]}, 4096]\n",
        "case.json": _case("LAYOUT_MISMATCH", 2, "cp-vision reference §1.6 (TransformerEngine#1368 layouts)",
                           "the hidden states and vision mask are split per document (THD), the vision rows per "
                           "sequence (a BSHD helper such as split_data_cp_rank on the whole row)"),
    }


def cp_size_mismatch() -> dict[str, Content]:
    """NVIDIA-NeMo/Megatron-Bridge#3881: one embedding path skipped the CP split (3904 vs 1952)."""
    segments = [
        [("text", 300), ("image", (1, 32, 32)), ("text", 420)],
        [("text", 1200), ("image", (1, 24, 32)), ("text", 250)],
        [("text", 700), ("video", (2, 16, 16)), ("text", 440)],
    ]
    batch = _padded_batch(segments, 4, "qwen3-vl", seed=3881)
    assert int(batch["cu_seqlens_padded"][-1]) == 3904, batch["cu_seqlens_padded"]
    return {
        "batch.pt": batch,
        "error.txt": "RuntimeError: Sizes of tensors must match except in dimension 0. Expected size 3904 but got size "
                     "1952 for tensor number 1 in the list.\n",
        "case.json": _case("CP_SIZE_MISMATCH", 2, "NVIDIA-NeMo/Megatron-Bridge#3881",
                           "Qwen3.5-VL + MTP + CP 2: the MTP embedding applied the SP scatter but not the CP split, "
                           "so a 3904-token tensor met a 1952-token one"),
    }


def segment_not_divisible() -> dict[str, Content]:
    """THUDM/slime#2376: the zigzag mapping called with CP size 1 on an odd packed length (4551)."""
    segments = [
        [("text", 900), ("image", (1, 32, 40)), ("text", 597)],
        [("text", 1400), ("image", (1, 16, 16)), ("text", 340)],
        [("text", 814), ("text", 112)],
    ]
    batch = build_batch(segments, tokens=token_config("qwen3-vl"), seed=2376)
    assert int(batch["cu_seqlens"][-1]) == 4551, batch["cu_seqlens"]
    return {
        "batch.pt": batch,
        "error.txt": "ValueError: Packed sequence length 4551 must be divisible by 2 * CP size 1\n",
        "case.json": _case("SEGMENT_NOT_DIVISIBLE", 1, "THUDM/slime#2376",
                           "without context parallelism (cp 1) the packed row of 4551 tokens went through the zigzag "
                           "mapping, which needs a multiple of 2 * cp"),
    }


def apply_kwarg() -> dict[str, Content]:
    """NVIDIA-NeMo/Megatron-Bridge#4391 / #4784: a keyword passed to autograd Function.apply."""
    return {
        "batch.pt": demo_batch_dict(),
        "error.txt": (
            "Traceback (most recent call last):\n"
            "  File \"model.py\", line 88, in forward\n"
            "    vision_embeds = AllGatherVisionEmbeddings.apply(vision_embeds, seqlens, cp_group=self.cp_group)\n"
            "TypeError: apply() takes no keyword arguments\n"
        ),
        "case.json": _case("APPLY_KWARG", 2, "NVIDIA-NeMo/Megatron-Bridge#4391 (and #4784)",
                           "vision_dp_when_cp called AllGatherVisionEmbeddings.apply(..., cp_group=...)"),
    }


def logical_cu_as_physical() -> dict[str, Content]:
    """Pre-sharded rows cut with padded boundaries, saved with only the logical cu_seqlens."""
    segments = [
        [("text", 9), ("image", (1, 8, 16)), ("text", 30)],
        [("text", 21), ("image", (1, 16, 16)), ("text", 4), ("image", (1, 8, 8)), ("text", 13)],
        [("text", 17)],
    ]
    full = _padded_batch(segments, 4, "qwen3-vl", seed=4917)
    held = _held(full, 2, "zigzag", token_config("qwen3-vl").image_token_id)
    files: dict[str, Content] = {}
    for rank, shard in enumerate(shard_batch(full, 2)):
        files[f"rank{rank}.pt"] = {k: v for k, v in shard.items() if k != "cu_seqlens_padded"}
    rows = int(full["vision_embed_count"])
    files["error.txt"] = (f"[rank0]: ValueError: Mismatch between local vision token count and local vision embedding "
                          f"rows: expected={held[0]}, got={rows}.\n")
    files["case.json"] = _case("LOGICAL_CU_AS_PHYSICAL", 2, "TransformerEngine cu_seqlens vs cu_seqlens_padded (§1.4)",
                               "each rank row was cut with the padded boundaries but saved with the logical "
                               "cu_seqlens only, so the model's pre-sharded test fails and all rows reach rank 0")
    return files


def grid_token_mismatch() -> dict[str, Content]:
    """An image grid from another resize: [1, 16, 20] promises 80 tokens, the span has 64."""
    batch = _two_images_per_segment()
    grid = batch["image_grid_thw"].clone()
    grid[2] = torch.tensor([1, 16, 20])
    batch["image_grid_thw"] = grid
    batch["vision_embed_count"] = (grid.prod(dim=1) // 4).sum()
    placeholders = int((batch["input_ids"] == token_config("qwen3-vl").image_token_id).sum())
    return {
        "batch.pt": batch,
        "error.txt": f"ValueError: Packed CP ranks contain {placeholders} vision tokens, but the vision encoder "
                     f"produced {int(batch['vision_embed_count'])} embeddings.\n",
        "case.json": _case("GRID_TOKEN_MISMATCH", 2, "Hugging Face 'features and tokens do not match' class",
                           "the grid of image 2 was recomputed with other resize limits than the expanded prompt"),
    }


def token_id_mismatch() -> dict[str, Content]:
    """Placeholders written with LLaVA-1.5's <image> id 32000 instead of Qwen's <|image_pad|>."""
    batch = _two_images_per_segment()
    ids = batch["input_ids"].clone()
    ids[ids == token_config("qwen3-vl").image_token_id] = 32000
    batch["input_ids"] = ids
    return {
        "batch.pt": batch,
        "error.txt": f"ValueError: Packed CP ranks contain 0 vision tokens, but the vision encoder produced "
                     f"{int(batch['vision_embed_count'])} embeddings.\n",
        "case.json": _case("TOKEN_ID_MISMATCH", 2, "model-family token ids (reference §4.1)",
                           "the samples were tokenized with a LLaVA template: every placeholder is id 32000"),
    }


def embed_count_mismatch() -> dict[str, Content]:
    """The encoder's rows miss one small image (4 tokens): 124 placeholders, 120 rows."""
    batch = demo_batch_dict()
    return {
        "batch.pt": batch,
        "error.txt": "ValueError: Packed CP ranks contain 124 vision tokens, but the vision encoder produced 120 "
                     "embeddings.\n",
        "case.json": _case("EMBED_COUNT_MISMATCH", 2, "Megatron-Bridge count check (reference §2.5 step 6)",
                           "the pixel_values of the 4x4-patch image in segment 3 never reached the encoder"),
    }


def batch_not_flat() -> dict[str, Content]:
    """Three samples stacked as input_ids [3, 168] instead of one packed row [1, 504]."""
    segments = [
        [("text", 30), ("image", (1, 16, 16)), ("text", 60)],
        [("text", 100), ("image", (1, 8, 8)), ("text", 20)],
        [("text", 140)],
    ]
    packed = build_batch(segments, [168, 168, 168], tokens=token_config("qwen3-vl"), seed=504)
    packed["input_ids"] = packed["input_ids"].view(3, 168)
    return {
        "batch.pt": packed,
        "error.txt": "RuntimeError: Sizes of tensors must match except in dimension 1. Expected size 504 but got size "
                     "168 for tensor number 1 in the list.\n",
        "case.json": _case("BATCH_NOT_FLAT", 2, "THD packing convention (reference §2.4: input_ids.size(0) == 1)",
                           "the collator stacked three padded samples instead of concatenating them"),
    }


def valid_only_row() -> dict[str, Content]:
    """Megatron-Bridge#5614 / verl#5981: padded chunk bounds sliced out of a row of only valid tokens."""
    segments = [
        [("text", 9), ("image", (1, 8, 8)), ("text", 10)],   # 37 valid tokens (9 + 1 + 16 + 1 + 10)
        [("text", 5)],                                        # a short sample: 5 valid tokens
        [("text", 3), ("image", (1, 4, 4)), ("text", 13)],  # 22 valid tokens
    ]
    batch = build_batch(segments, tokens=token_config("qwen2.5-vl"), seed=5614)
    logical = batch["cu_seqlens"]
    lengths = (logical[1:] - logical[:-1]).tolist()
    assert lengths == [37, 5, 22], lengths
    padded = [_pad(n, 4) for n in lengths]  # 40, 8, 24: what the sampler pads to for cp=2
    batch["cu_seqlens_padded"] = torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32)
    # rank 0 holds chunks 0 and 3 of segment 1; chunk 3 is offsets 6-7 of a segment with 5 valid tokens
    return {
        "batch.pt": batch,
        "error.txt": "[rank0]: Traceback (most recent call last):\n"
                     "[rank0]:   File \"megatron/bridge/training/utils/packed_seq_utils.py\", in "
                     "get_batch_on_this_cp_rank\n"
                     "[rank0]: RuntimeError: The expanded size of the tensor (2) must match the existing size (0) at "
                     "non-singleton dimension 0.  Target sizes: [2].  Tensor sizes: [0]\n",
        "case.json": _case("VALID_ONLY_ROW", 2,
                           "NVIDIA-NeMo/Megatron-Bridge#5614 (verl#5981, #6001, #7261; mbridge#157, #158; SkyRL#1407)",
                           "the row holds only the valid tokens, the CP slicing uses the bounds of the padded "
                           "segments: the short sample's last chunk is empty on rank 0",
                           args=("--model", "qwen2.5-vl")),
    }


def mrope_local_row() -> dict[str, Content]:
    """miles#1296 / ms-swift#3215: get_rope_index run on each rank's CP-local row with the full grids."""
    segments = [
        [("text", 32)],
        [("text", 20), ("image", (1, 8, 16)), ("text", 10)],  # 20 + 1 + 32 + 1 + 10 = 64 tokens
    ]
    batch = build_batch(segments, tokens=token_config("qwen2.5-vl"), seed=1296)
    assert batch["cu_seqlens"].tolist() == [0, 32, 96]
    # zigzag at cp=2: rank 1 holds chunks 1, 2 of each segment: 16 text tokens of segment 0, then offsets 16-47 of
    # segment 1: 4 text, <|vision_start|> at 20, and 27 of the image's 32 placeholders (the rest is on rank 0).
    # get_rope_index on that local row: 21 text positions, then the whole grid 1·8·16/4 = 32: 53 positions, 48 tokens.
    local, text, grid = 16 + 32, 16 + 4 + 1, 1 * 8 * 16 // 4
    return {
        "batch.pt": batch,
        "error.txt": "[rank1]: Traceback (most recent call last):\n"
                     "[rank1]:   File \"transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py\", in get_rope_index\n"
                     f"[rank1]: RuntimeError: shape mismatch: value tensor of shape [3, {text + grid}] cannot be "
                     f"broadcast to indexing result of shape [3, {local}]\n",
        "case.json": _case("MROPE_LOCAL_ROW", 2, "radixark/miles#1296 (modelscope/ms-swift#3215)",
                           "position ids computed after the CP split, on each rank's local row, with the grids of "
                           "the whole micro-batch", args=("--model", "qwen2.5-vl")),
    }


def double_sharded() -> dict[str, Content]:
    """radixark/miles#1308: already CP-local rows sharded again by the model (Bridge preprocess_packed_seqs)."""
    segments = [
        [("text", 14), ("image", (1, 8, 8)), ("text", 40)],
        [("text", 30), ("image", (1, 4, 8)), ("text", 12), ("image", (1, 4, 4)), ("text", 9)],
        [("text", 21)],
    ]
    full = _padded_batch(segments, 8, "qwen3-vl", seed=1308)  # 2·cp² = 8: both splits cut evenly
    cu = full["cu_seqlens_padded"].to(torch.long)
    files: dict[str, Content] = {}
    for rank, local in enumerate(shard_batch(full, 2)):
        # the model's own split, run on the local row with the local boundaries (cu / cp)
        again = shard_batch({"input_ids": local["input_ids"], "cu_seqlens": torch.div(cu, 2, rounding_mode="floor")},
                            2)[rank]
        shard = {k: v for k, v in local.items() if k != "input_ids"}
        shard["input_ids"] = again["input_ids"]
        files[f"rank{rank}.pt"] = shard
    total = int(cu[-1])
    files["error.txt"] = (
        "[rank0]: Traceback (most recent call last):\n"
        "[rank0]:   File \"megatron/bridge/models/qwen_vl/modeling_qwen3_vl/model.py\", in forward\n"
        f"[rank0]: RuntimeError: Sizes of tensors must match except in dimension 1. Expected size {total // 2} but got "
        f"size {total // 4} for tensor number 1 in the list.\n")
    files["case.json"] = _case("DOUBLE_SHARDED", 2, "radixark/miles#1308 (Megatron-Bridge preprocess_packed_seqs on "
                               "already-local rows)",
                               "the data loader split the batch over CP, the model split each local row again")
    return files


def rope_segment_offset_missing() -> dict[str, Content]:
    """NVIDIA/Megatron-LM#5243: the position table's columns selected without each segment's offset."""
    from cpinspect.core.mrope import row_positions

    segments = [
        [("text", 6), ("image", (1, 4, 8)), ("text", 17)],
        [("text", 11), ("image", (1, 8, 8)), ("text", 3), ("image", (1, 4, 4)), ("text", 5)],
    ]
    tokens = token_config("qwen3-vl")
    full = _padded_batch(segments, 4, "qwen3-vl", seed=5243)
    cu = full["cu_seqlens_padded"].to(torch.long)
    table = row_positions(full["input_ids"].reshape(-1), cu, tokens, image_grid_thw=full["image_grid_thw"],
                          logical_cu_seqlens=full["cu_seqlens"])
    plan = make_layout(cu, 2, "zigzag")
    files: dict[str, Content] = {}
    for rank, shard in enumerate(shard_batch(full, 2)):
        index = plan.global_indices(rank)
        offsets = index - cu[torch.searchsorted(cu[1:], index, right=True)]  # the bug: no segment start added
        shard["position_ids"] = table[:, offsets].unsqueeze(1).clone()
        files[f"rank{rank}.pt"] = shard
    files["error.txt"] = (
        "step 40 | lm loss 2.91 | grad norm 1.02\n"
        "step 41 | lm loss 7.85 | grad norm 48.3   (no error: the loss jumps on packed batches only)\n")
    files["case.json"] = _case("ROPE_SEGMENT_OFFSET_MISSING", 2, "NVIDIA/Megatron-LM#5243",
                               "the rotary table of the packed row was indexed with offsets inside each sequence "
                               "(cu [0, 4, 8], cp 2: rank 0 got [0, 3, 0, 3] instead of [0, 3, 4, 7])")
    return files


def rope_segment_offset_missing_1d() -> dict[str, Content]:
    """NVIDIA/Megatron-LM#5243, 1-D RoPE: the packed per-token table indexed with offsets inside each sequence."""
    segments = [[("text", 14)], [("text", 37)], [("text", 23)], [("text", 50)]]  # a short first sequence
    full = _padded_batch(segments, 4, "qwen3-vl", seed=5244)
    cu = full["cu_seqlens_padded"].to(torch.long)
    segment = torch.searchsorted(cu[1:], torch.arange(int(cu[-1])), right=True)
    table = torch.arange(int(cu[-1])) - cu[segment]  # the packed row's positions: each sequence counts from 0
    plan = make_layout(cu, 2, "zigzag")
    files: dict[str, Content] = {}
    for rank, shard in enumerate(shard_batch(full, 2)):
        index = plan.global_indices(rank)
        offsets = index - cu[torch.searchsorted(cu[1:], index, right=True)]  # the bug: no cu_seqlens[i] added
        shard["position_ids"] = table[offsets].view(1, -1).clone()
        files[f"rank{rank}.pt"] = shard
    files["error.txt"] = (
        "step 118 | lm loss 2.47 | grad norm 0.88\n"
        "step 119 | lm loss 6.02 | grad norm 31.7   (no error: with --context-parallel-size 2 and packed sequences "
        "the loss is far above the cp 1 run)\n")
    files["case.json"] = _case("ROPE_SEGMENT_OFFSET_MISSING", 2, "NVIDIA/Megatron-LM#5243 (1-D RoPE)",
                               "the packed per-token RoPE table (freqs.size(0) == cu_seqlens[-1]) was indexed with "
                               "each token's offset inside its sequence: a later sequence's tokens past the first "
                               "sequence's length read another sequence's positions")
    return files


def layout_mismatch_positions() -> dict[str, Content]:
    """THUDM/slime#1871: data laid out contiguously per rank, attention reshuffles it as zigzag (text only)."""
    segments = [[("text", 44)], [("text", 28)], [("text", 19)], [("text", 61)]]
    full = _padded_batch(segments, 4, "qwen3-vl", seed=1871)
    cu = full["cu_seqlens_padded"].to(torch.long)
    plan = make_layout(cu, 2, "contiguous")
    files: dict[str, Content] = {}
    for rank, shard in enumerate(shard_batch(full, 2, "contiguous")):
        index = plan.global_indices(rank)
        text = index - cu[torch.searchsorted(cu[1:], index, right=True)]  # text: t = h = w = offset in segment
        shard["position_ids"] = text.expand(3, -1).unsqueeze(1).clone()
        files[f"rank{rank}.pt"] = shard
    files["error.txt"] = ("step 3 | loss 1.92 | ppl 6.8\nstep 4 | loss 5.41 | ppl 223.6\n"
                          "(no error: with context parallelism on, the loss is far above the cp=1 run)\n")
    files["case.json"] = _case("LAYOUT_MISMATCH", 2, "THUDM/slime#1871 (Megatron-LM#6764: linear vs attention layouts)",
                               "the data loader gave each rank a contiguous slice; the attention kernel assumes the "
                               "zigzag layout")
    return files


def vision_dp_empty_rank_skips_collective() -> dict[str, Content]:
    """Megatron-Bridge#4784: vision DP over cp=4 with two images; the empty ranks skip the backward all-reduce."""
    segments = [[("text", 6), ("image", (1, 4, 4)), ("text", 6)], [("text", 10), ("image", (1, 4, 8)), ("text", 10)]]
    batch = _padded_batch(segments, 8, "qwen3-vl", seed=4784)
    # vision_dp_when_cp: image 0 on rank 0, image 1 on rank 1; ranks 2 and 3 encode nothing, and their zero-row
    # placeholder does not require grad (no ensure_requires_grad_for_cp_collective)
    batch["vision_requires_grad"] = torch.tensor([True, True, False, False])
    rows = (4 * 4 + 4 * 8) // 4  # 12 gathered rows, hidden 2048
    return {
        "batch.pt": batch,
        "error.txt": "[rank0]:[E1201 10:12:44.518 ProcessGroupNCCL.cpp:632] [Rank 0] Watchdog caught collective "
                     f"operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE, NumelIn={rows * 2048}, "
                     f"NumelOut={rows * 2048}, Timeout(ms)=600000) ran for 600012 milliseconds before timing out.\n",
        "case.json": _case("VISION_DP_EMPTY_RANK_SKIPS_COLLECTIVE", 4, "NVIDIA-NeMo/Megatron-Bridge#4784",
                           "vision_dp_when_cp at cp=4 with two images: ranks 2 and 3 encode none and skip the "
                           "backward all-reduce; ranks 0 and 1 hang in it"),
    }


def mrope_local_row_positions() -> dict[str, Content]:
    """miles#1296, the silent form: every image whole on one rank, positions recomputed on each local row."""
    from cpinspect.core.mrope import row_positions

    segments = [[("text", 2), ("image", (1, 4, 4)), ("text", 11), ("image", (1, 4, 8)), ("text", 35)], [("text", 32)]]
    tokens = token_config("qwen3-vl")
    full = build_batch(segments, tokens=tokens, seed=1297)
    assert full["cu_seqlens"].tolist() == [0, 64, 96]
    grids = full["image_grid_thw"]
    # zigzag at cp=2: image 0 (offsets 3-6) lies in chunk 0 (rank 0), image 1 (offsets 20-27) in chunk 1 (rank 1)
    held_grids = {0: grids[0:1], 1: grids[1:2]}
    files: dict[str, Content] = {}
    for rank, shard in enumerate(shard_batch(full, 2)):
        ids = shard["input_ids"].reshape(-1)
        local = row_positions(ids, torch.tensor([0, ids.numel()]), tokens, image_grid_thw=held_grids[rank])
        shard["position_ids"] = local.unsqueeze(1).clone()
        files[f"rank{rank}.pt"] = shard
    files["error.txt"] = "step 9 | loss 2.03\nstep 10 | loss 2.05   (no error: accuracy on images drops under CP)\n"
    files["case.json"] = _case("MROPE_LOCAL_ROW", 2, "radixark/miles#1296 (silent form)",
                               "position ids recomputed after the CP split on each local row: the shapes fit, the "
                               "positions restart at every rank's first token")
    return files


# --------------------------------------------------------------------------- audio (issue 13 item 5)
AUDIO_END = 151648  # <|audio_eos|> (audio_end_token_id of the Qwen2.5-Omni configs)
OMNI_SEGMENTS = (  # (kind, spec): text n / image or video (t, h, w) / audio [mel frames of the items of one span]
    (("text", 40), ("image", (1, 16, 20)), ("text", 21), ("audio", [250]), ("text", 30)),
    (("text", 17), ("audio", [173]), ("text", 9), ("audio", [480]), ("text", 30)),
    (("text", 25), ("video", (2, 12, 16)), ("text", 11), ("audio", [96]), ("text", 8)),
)


def omni_batch(segments: Sequence[Sequence[tuple[str, Any]]] = OMNI_SEGMENTS, *, model: str = "qwen3-omni",
               rule: str | None = None, multiple: int = 4, seed: int = 5256) -> dict[str, torch.Tensor]:
    """A Qwen-Omni packed row with images, videos and audio, each segment padded to ``multiple``.

    Every audio span holds ``audio_tokens(rule, sum of its items' frames)`` placeholders (``rule`` defaults
    to ``model``: a correct batch); ``audio_feature_lengths`` lists every item's mel frames, one per item.
    """
    from cpinspect.core.tokens import AUDIO_PAD, AUDIO_START, audio_tokens

    tokens, generator = token_config(model), torch.Generator().manual_seed(seed)
    rows, logical, physical, images, videos, lengths = [], [], [], [], [], []
    for items in segments:
        parts = []
        for kind, spec in items:
            if kind == "text":
                parts.append(torch.randint(100, 150000, (spec,), generator=generator))
            elif kind == "audio":
                lengths += spec
                count = audio_tokens(rule or model, sum(spec))
                parts.append(torch.tensor([AUDIO_START] + [AUDIO_PAD] * count + [AUDIO_END]))
            else:
                (images if kind == "image" else videos).append(list(spec))
                pad = tokens.image_token_id if kind == "image" else tokens.video_token_id
                count = spec[0] * spec[1] * spec[2] // tokens.merge_area
                parts.append(torch.tensor([tokens.vision_start_token_id, *[pad] * count, tokens.vision_end_token_id]))
        row = torch.cat(parts)
        logical.append(row.numel())
        physical.append(_pad(row.numel(), multiple))
        rows.append(torch.cat([row, torch.full((physical[-1] - row.numel(),), tokens.pad_token_id)]))
    cumsum = lambda values: torch.cumsum(torch.tensor([0, *values]), 0).to(torch.int32)  # noqa: E731
    return {"input_ids": torch.cat(rows).view(1, -1), "cu_seqlens": cumsum(logical),
            "cu_seqlens_padded": cumsum(physical),
            "image_grid_thw": torch.tensor(images, dtype=torch.long).view(-1, 3),
            "video_grid_thw": torch.tensor(videos, dtype=torch.long).view(-1, 3),
            "audio_feature_lengths": torch.tensor(lengths, dtype=torch.long)}


def _audio_error(tokens: int, features: int, rank: int | None = None) -> str:
    prefix = f"[rank{rank}]: " if rank is not None else ""
    lines = ["Traceback (most recent call last):",
             f"ValueError: Audio features and audio tokens do not match: tokens={tokens}, features={features}"]
    return "".join(f"{prefix}{line}\n" for line in lines)


def _audio_counts(batch: dict[str, torch.Tensor], rule: str) -> tuple[int, int]:
    """(audio placeholders in the row, Σ rule(frames) over the items): only to write the error texts."""
    from cpinspect.core.tokens import AUDIO_PAD, audio_tokens

    lengths = batch["audio_feature_lengths"].tolist()
    return int((batch["input_ids"] == AUDIO_PAD).sum()), sum(audio_tokens(rule, n) for n in lengths)


def audio_count_mismatch_stale_formula() -> dict[str, Content]:
    """Megatron-Bridge#5256 (a): Qwen3-Omni audio placeholders expanded with the older Qwen2.5-Omni formula."""
    batch = omni_batch(rule="qwen2.5-omni")
    tokens, features = _audio_counts(batch, "qwen3-omni")
    assert (tokens, features) == (249, 130), (tokens, features)
    return {"batch.pt": batch, "error.txt": _audio_error(tokens, features),
            "case.json": _case("AUDIO_COUNT_MISMATCH", 2, "NVIDIA-NeMo/Megatron-Bridge#5256 (stale formula)",
                               "every audio item was expanded to the Qwen2.5-Omni count of placeholders; the "
                               "Qwen3-Omni encoder yields fewer rows", args=["--model", "qwen3-omni"])}


def audio_count_mismatch_per_row() -> dict[str, Content]:
    """Megatron-Bridge#5256 (b): a sample's two audio items' placeholders counted once, from their summed frames."""
    segments = (OMNI_SEGMENTS[0], (("text", 17), ("audio", [173, 250]), ("text", 12)), OMNI_SEGMENTS[2])
    batch = omni_batch(segments)
    tokens, features = _audio_counts(batch, "qwen3-omni")
    assert (tokens, features) == (100, 101), (tokens, features)
    return {"batch.pt": batch, "error.txt": _audio_error(tokens, features),
            "case.json": _case("AUDIO_COUNT_MISMATCH", 2, "NVIDIA-NeMo/Megatron-Bridge#5256 (per row, not per item)",
                               "segment 1's two audio items (173 and 250 mel frames) got one span of rule(423) = 55 "
                               "placeholders; the encoder yields 23 + 33 = 56 rows for them",
                               args=["--model", "qwen3-omni"])}


def audio_count_mismatch_cp_local() -> dict[str, Content]:
    """A correct Omni batch at cp 2 whose audio check counts rank 1's local placeholders against all features."""
    from cpinspect.core.tokens import AUDIO_PAD

    batch = omni_batch()
    held = _held(batch, 2, "zigzag", AUDIO_PAD)
    tokens, features = _audio_counts(batch, "qwen3-omni")
    assert tokens == features == 130 and held == [55, 75], (tokens, features, held)
    log = "[rank0]: step 3 | loss 2.41\n[rank1]: step 3 | loss 2.44\n" + _audio_error(held[1], features, rank=1)
    return {"batch.pt": batch, "train.log": log,
            "case.json": _case("AUDIO_COUNT_MISMATCH", 2, "NVIDIA-NeMo/Megatron-Bridge#5256 (CP: local tokens)",
                               "the audio check ran after the CP split: rank 1's 75 local placeholders against the "
                               "130 rows of every audio item", error_file="train.log", args=["--model", "qwen3-omni"])}


# --------------------------------------------------------------------------- issue 14: classes 6 and 7


SP_NOTE = ("the run used tp 4 with sequence parallelism: --tp 4 --sequence-parallel keeps only that tp; without "
           "them diagnose reads tp 4 from the numbers (an integer above 1 that makes them fit)")
SP_ARGS = ("--tp", "4", "--sequence-parallel")


def cp_split_missing() -> dict[str, Content]:
    """NVIDIA-NeMo/Megatron-Bridge#3881 at tp 4 with sequence parallelism: the MTP embedding skipped the CP split."""
    segments = [
        [("text", 1800), ("image", (1, 48, 64)), ("text", 900)],
        [("text", 2500), ("image", (1, 32, 48)), ("text", 1400)],
        [("text", 2000), ("video", (2, 32, 32)), ("text", 1992)],
    ]
    batch = _padded_batch(segments, 2 * 2 * 4, "qwen3-vl", seed=3881)  # SP on: segments padded to 2·cp·tp = 16
    total = int(batch["cu_seqlens_padded"][-1])
    assert total == 12288, batch["cu_seqlens_padded"]
    return {
        "batch.pt": batch,
        "error.txt": "[rank3]: Traceback (most recent call last):\n"
                     "[rank3]:   File \"megatron/core/transformer/multi_token_prediction.py\", in forward\n"
                     "[rank3]: RuntimeError: Sizes of tensors must match except in dimension 0. Expected size "
                     f"{total // 4} but got size {total // 8} for tensor number 1 in the list.\n",
        "case.json": _case("CP_SPLIT_MISSING", 2, "NVIDIA-NeMo/Megatron-Bridge#3881 (cp 2, tp 4, sequence parallel)",
                           "Qwen3.5-VL + MTP with context_parallel_size 2, tensor_model_parallel_size 4 and "
                           "sequence_parallel: the MTP embedding of the 12288-token row was scattered over TP "
                           "(3072 = 12288 / 4) but not split over CP, and met the 1536-token hidden states; "
                           + SP_NOTE, args=SP_ARGS),
    }


def sp_split_missing() -> dict[str, Content]:
    """The mirror of Megatron-Bridge#3881: a tensor CP-split but not scattered over TP (sequence parallelism)."""
    segments = [
        [("text", 900), ("image", (1, 32, 48)), ("text", 1100)],
        [("text", 1500), ("image", (1, 32, 32)), ("text", 700)],
        [("text", 2700), ("text", 620)],
    ]
    batch = _padded_batch(segments, 2 * 2 * 4, "qwen3-vl", seed=3882)
    total = int(batch["cu_seqlens_padded"][-1])
    assert total == 8192, batch["cu_seqlens_padded"]
    return {
        "batch.pt": batch,
        "error.txt": "[rank1]: RuntimeError: Sizes of tensors must match except in dimension 0. Expected size "
                     f"{total // 2} but got size {total // 8} for tensor number 1 in the list.\n",
        "case.json": _case("SP_SPLIT_MISSING", 2, "NVIDIA-NeMo/Megatron-Bridge#3881, the mirrored slip (cp 2, tp 4, "
                           "sequence parallel)",
                           "cp 2, tp 4, sequence_parallel: one embedding of the 8192-token row was split over CP "
                           f"(4096 = 8192 / 2) but never scattered over TP, and met the 1024-token hidden states; "
                           f"{SP_NOTE}", args=SP_ARGS),
    }


def vision_dp_placeholder() -> dict[str, Content]:
    """Nemotron Omni vision_dp_over_cp / Megatron-LM#7315: the empty ranks' 1x1 placeholder rows were gathered."""
    segments = [[("text", 6), ("image", (1, 4, 4)), ("text", 6)], [("text", 10), ("image", (1, 4, 8)), ("text", 10)]]
    batch = _padded_batch(segments, 8, "qwen3-vl", seed=7315)
    # two images over cp=4: ranks 2 and 3 encode none, so the stack gives each a 1x1 placeholder image
    # (4 patches -> 1 merged row) to keep the encoder and its backward all-reduce running on every rank
    batch["vision_dp_placeholder"] = torch.tensor([True, True, True, True])
    tokens = int((batch["input_ids"] == token_config("qwen3-vl").image_token_id).sum())
    assert tokens == (4 * 4 + 4 * 8) // 4 == 12
    return {
        "batch.pt": batch,
        "error.txt": "[rank0]: Traceback (most recent call last):\n"
                     "[rank0]:   File \"megatron/bridge/models/qwen_vl/modelling_qwen3_vl/model.py\", in forward\n"
                     f"[rank0]: ValueError: Packed CP ranks contain {tokens} vision tokens, but the vision encoder "
                     f"produced {tokens + 2} embeddings.\n",
        "case.json": _case("VISION_DP_PLACEHOLDER", 4, "Nemotron Omni vision_dp_over_cp (Megatron-LM#7315)",
                           "vision DP over cp=4 with two images: ranks 2 and 3 encode a 1x1 placeholder image, "
                           "whose one row each was all-gathered with the real rows instead of being dropped"),
    }


CASES: dict[str, Callable[[], dict[str, Content]]] = {
    "presharded_rows_not_selected": presharded_rows_not_selected,
    "truncated_vision_span": truncated_vision_span,
    "layout_mismatch": layout_mismatch,
    "cp_size_mismatch": cp_size_mismatch,
    "segment_not_divisible": segment_not_divisible,
    "apply_kwarg": apply_kwarg,
    "logical_cu_as_physical": logical_cu_as_physical,
    "grid_token_mismatch": grid_token_mismatch,
    "token_id_mismatch": token_id_mismatch,
    "embed_count_mismatch": embed_count_mismatch,
    "batch_not_flat": batch_not_flat,
    "valid_only_row": valid_only_row,
    "mrope_local_row": mrope_local_row,
    "double_sharded": double_sharded,
    "rope_segment_offset_missing": rope_segment_offset_missing,
    "rope_segment_offset_missing_1d": rope_segment_offset_missing_1d,
    "layout_mismatch_positions": layout_mismatch_positions,
    "vision_dp_empty_rank_skips_collective": vision_dp_empty_rank_skips_collective,
    "mrope_local_row_positions": mrope_local_row_positions,
    "audio_count_mismatch_stale_formula": audio_count_mismatch_stale_formula,
    "audio_count_mismatch_per_row": audio_count_mismatch_per_row,
    "audio_count_mismatch_cp_local": audio_count_mismatch_cp_local,
    "cp_split_missing": cp_split_missing,
    "sp_split_missing": sp_split_missing,
    "vision_dp_placeholder": vision_dp_placeholder,
}


def example_files() -> dict[str, Content]:
    """Relative path (under ``broken/``) -> tensors or text, for every case."""
    files: dict[str, Content] = {}
    for name, build in CASES.items():
        for relative, content in build().items():
            files[f"{name}/{relative}"] = content
    return files


def write(out: Path) -> list[Path]:
    return write_files(example_files(), out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "broken")
    for path in write(parser.parse_args().out):
        print(path)
