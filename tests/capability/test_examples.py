"""The committed example batches are exactly what examples/make_examples.py generates."""

import importlib.util
from pathlib import Path

import pytest
import torch

from cpinspect.core.loading import load_batch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _generator():
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(_generator().example_files()))
def test_committed_file_equals_generator_output(name):
    expected = _generator().example_files()[name]
    path = EXAMPLES / name
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        committed = load_file(str(path))
    else:
        committed = torch.load(path, weights_only=True)
    assert sorted(committed) == sorted(expected)
    for key, value in expected.items():
        assert committed[key].dtype == value.dtype, key
        assert torch.equal(committed[key], value), key


def test_example_properties_the_readme_promises():
    from cpinspect.simulation.run import simulate

    batch = load_batch(EXAMPLES / "qwen3vl_packed.pt")
    cp2 = simulate(batch, 2)
    # the first image (global 15..78 of segment 0) crosses the rank boundaries at 24 and 72
    assert cp2.gathered_counts[0].tolist() == [9, 24, 24, 7]
    cp4 = simulate(batch, 4)
    assert cp4.ranks[0].local_mask.sum() == 0  # a rank with no vision tokens
    assert cp4.ranks[0].selected_rows.numel() == 0 and cp4.ok
