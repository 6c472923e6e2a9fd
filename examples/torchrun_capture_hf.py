"""A Hugging Face Qwen2-VL model under torchrun, captured by ``cpinspect.jobs.hooks.capture_hf`` — no model edits.

    torchrun --nproc-per-node 2 examples/torchrun_capture_hf.py --out capture/
    cpinspect analyze capture/

Each rank builds the same tiny, randomly initialised Qwen2-VL (no download), takes its zigzag share of one
packed row with two images, and runs the unmodified model inside ``capture_hf``, which records what the
forward received on every rank. An unmodified HF model scatters the first image rows into every rank's
placeholders, so at cp 2 ``analyze`` names rank 1's rows (exit 1); at cp 1 it is consistent.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import transformers

from cpinspect.jobs.hooks import capture_hf

IMG, VS, VE = 151655, 151652, 151653
GRID = torch.tensor([[1, 4, 4], [1, 4, 8]])


def packed_row() -> list[int]:
    ids = [1000, 1001, VS] + [IMG] * 4 + [VE] + [1002] * 4 + [VS] + [IMG] * 8 + [VE] + [1003] * 3
    return ids + [1004] * ((-len(ids)) % 8)


def zigzag_share(total: int, cp: int, rank: int) -> list[int]:
    """Chunks ``rank`` and ``2*cp-1-rank`` of ``2*cp`` (one segment), in local order."""
    chunk = total // (2 * cp)
    return [*range(rank * chunk, (rank + 1) * chunk), *range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)]


def tiny_qwen2vl() -> transformers.Qwen2VLForConditionalGeneration:
    config = transformers.Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=151680,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, in_chans=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    ids = packed_row()
    local = torch.tensor([ids[g] for g in zigzag_share(len(ids), cp, rank)]).view(1, -1)
    torch.manual_seed(1)
    pixels = torch.randn(int(GRID.prod(dim=1).sum()), 3 * 2 * 14 * 14)
    model = tiny_qwen2vl()
    with capture_hf(model, args.out, cp_group=dist.group.WORLD, cu_seqlens=torch.tensor([0, len(ids)]), enabled=True):
        try:
            with torch.no_grad():
                model(input_ids=local, pixel_values=pixels, image_grid_thw=GRID)
        except ValueError as exc:  # HF refuses when a rank's placeholders are not all the rows
            print(f"rank {rank}: the model raised: {exc}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
