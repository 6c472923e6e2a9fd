"""Regenerate the example batches of the mRoPE and vision-DP checks (one per finding code).

    python examples/make_pipeline_examples.py            # writes examples/pipeline/
    python examples/make_pipeline_examples.py --out DIR  # writes DIR/pipeline/

Each example is the bundled demo batch (or a small one) with one realistic mistake; ``COMMANDS``
says how to see it (tests run every command and check that exactly its code is reported).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402

from cpinspect.core.mrope import row_positions  # noqa: E402
from cpinspect.core.synth import build_batch, demo_batch_dict, shard_batch, write_files  # noqa: E402
from cpinspect.core.tokens import token_config  # noqa: E402

HERE = Path(__file__).resolve().parent

# example (relative path) -> (simulate arguments after the batch, the finding code it shows)
COMMANDS: dict[str, tuple[list[str], str]] = {
    "pipeline/mrope_not_per_segment.pt": (["--cp", "2", "--positions"], "MROPE_NOT_PER_SEGMENT"),
    "pipeline/mrope_wrong_slice": (["--cp", "2", "--positions"], "MROPE_WRONG_SLICE"),
    "pipeline/mrope_mismatch.pt": (["--cp", "2", "--positions"], "MROPE_MISMATCH"),
    "pipeline/vision_dp_order.pt": (["--cp", "2", "--vision-dp"], "VISION_DP_ORDER"),
    "pipeline/vision_dp_empty_rank.pt": (["--cp", "4", "--vision-dp"], "VISION_DP_EMPTY_RANK_SKIPS_COLLECTIVE"),
    "pipeline/deepstack_not_selected": (["--cp", "2", "--vision-dp"], "DEEPSTACK_NOT_SELECTED"),
}

# Two images for four CP ranks: ranks 2 and 3 encode nothing under the count split.
TWO_IMAGES = (
    (("text", 6), ("image", (1, 4, 4)), ("text", 6)),
    (("text", 10), ("image", (1, 4, 8)), ("text", 10)),
)


def _positions(batch: dict[str, torch.Tensor], *, whole_row: bool = False,
               image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """``[3, 1, T]`` per-segment positions of a full demo row (optionally with a wrong grid or whole-row)."""
    grid = batch["image_grid_thw"] if image_grid_thw is None else image_grid_thw
    positions = row_positions(batch["input_ids"].reshape(-1), batch["cu_seqlens_padded"].long(), token_config(),
                              image_grid_thw=grid, video_grid_thw=batch["video_grid_thw"],
                              logical_cu_seqlens=batch["cu_seqlens"].long(), whole_row=whole_row)
    return positions.view(3, 1, -1)


def _not_per_segment() -> dict[str, torch.Tensor]:
    """miles #1272: positions computed over the whole packed row instead of per segment."""
    batch = demo_batch_dict()
    batch["position_ids"] = _positions(batch, whole_row=True)
    return batch


def _wrong_slice() -> list[dict[str, torch.Tensor]]:
    """Pre-sharded ids in zigzag, but the right positions cut into contiguous halves."""
    batch = demo_batch_dict()
    positions = _positions(batch)
    shards = shard_batch(batch, cp=2)
    for shard, part in zip(shards, positions.chunk(2, dim=-1)):
        shard["position_ids"] = part.clone()
    return shards


def _mismatch() -> dict[str, torch.Tensor]:
    """Positions computed with the image grids' h and w swapped (the second image is 8 x 12 patches)."""
    batch = demo_batch_dict()
    batch["position_ids"] = _positions(batch, image_grid_thw=batch["image_grid_thw"][:, [0, 2, 1]])
    return batch


def _dp_order() -> dict[str, torch.Tensor]:
    """Items dealt round-robin over 2 ranks: rank 0 encodes items 0, 2, 4 and rank 1 items 1, 3."""
    batch = demo_batch_dict()
    batch["vision_dp_ranks"] = torch.tensor([0, 1, 0, 1, 0])
    return batch


def _empty_rank() -> dict[str, torch.Tensor]:
    """Two images over 4 ranks; the empty ranks' placeholders do not require grad (pre #4784)."""
    batch = build_batch(TWO_IMAGES, (24, 40), seed=7)
    batch["vision_requires_grad"] = torch.tensor([True, True, False, False])
    return batch


def _deepstack_not_selected() -> list[dict[str, torch.Tensor]]:
    """Pre-sharded cp 2: each rank feeds all 124 deepstack rows (3 features) instead of its own."""
    shards = shard_batch(demo_batch_dict(), cp=2)
    for shard in shards:
        shard["deepstack_rows"] = torch.tensor([124, 124, 124])
    return shards


def example_files() -> dict[str, dict[str, torch.Tensor]]:
    """Relative path -> tensors, for every example this script owns."""
    files = {
        "pipeline/mrope_not_per_segment.pt": _not_per_segment(),
        "pipeline/mrope_mismatch.pt": _mismatch(),
        "pipeline/vision_dp_order.pt": _dp_order(),
        "pipeline/vision_dp_empty_rank.pt": _empty_rank(),
    }
    for name, shards in (("mrope_wrong_slice", _wrong_slice()), ("deepstack_not_selected", _deepstack_not_selected())):
        for rank, shard in enumerate(shards):
            files[f"pipeline/{name}/rank{rank}.pt"] = shard
    return files


def write(out: Path) -> list[Path]:
    return write_files(example_files(), out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE)
    for path in write(parser.parse_args().out):
        print(path)
