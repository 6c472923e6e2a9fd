"""Regenerate the bundled example batches (deterministic; tests compare them with this output).

    python examples/make_examples.py            # writes next to this file
    python examples/make_examples.py --out DIR  # writes elsewhere
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402

from cpinspect.core.synth import demo_batch_dict, shard_batch, write_files  # noqa: E402

HERE = Path(__file__).resolve().parent


def example_files() -> dict[str, dict[str, torch.Tensor]]:
    """Relative path -> tensors, for every example this script owns."""
    full = demo_batch_dict()
    files = {
        "qwen3vl_packed.pt": full,
        "qwen3vl_packed.safetensors": full,
    }
    for rank, shard in enumerate(shard_batch(full, cp=2)):
        files[f"presharded_cp2/rank{rank}.pt"] = shard
    return files


def write(out: Path) -> list[Path]:
    return write_files(example_files(), out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE)
    for path in write(parser.parse_args().out):
        print(path)
