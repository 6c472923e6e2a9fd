"""The CP attention programs of examples/cp_programs run unmodified under the simulated group and
match full attention on the unsharded row: outputs and gradients of q, k and v, on random packed
rows. The oracle is torch's own scaled_dot_product_attention, one causal call per document."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from cpinspect.groups.simulated import run_spmd

# loaded by path, not as `examples.…`: importing the examples namespace package would change how
# other tests' examples/impls files resolve
_spec = importlib.util.spec_from_file_location(
    "cpinspect_example_cp_attention", Path(__file__).resolve().parents[2] / "examples" / "cp_programs" / "attention.py")
attention = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attention)
allgather_kv_attention, ulysses_attention = attention.allgather_kv_attention, attention.ulysses_attention
ring_attention, zigzag_indices = attention.ring_attention, attention.zigzag_indices

HEADS, DIM = 4, 8


def random_row(seed, cp, heads=HEADS):
    g = torch.Generator().manual_seed(seed)
    docs = torch.randint(1, 4, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g) * 2 * cp
    cu = [0, *torch.cumsum(docs, 0).tolist()]
    q, k, v = (torch.randn(cu[-1], heads, DIM, generator=g, dtype=torch.float64) for _ in range(3))
    weight = torch.randn(cu[-1], heads, DIM, generator=g, dtype=torch.float64)
    return cu, q, k, v, weight


def full_attention(q, k, v, cu):
    outs = []
    for s, e in zip(cu[:-1], cu[1:]):
        per_doc = [x[s:e].transpose(0, 1) for x in (q, k, v)]  # [heads, L, dim]
        outs.append(scaled_dot_product_attention(*per_doc, is_causal=True).transpose(0, 1))
    return torch.cat(outs)


def rank_program(group, program, cu, q, k, v, weight):
    held = zigzag_indices(cu, group.size(), group.rank())
    local = [x[held].clone().requires_grad_(True) for x in (q, k, v)]
    out = program(*local, cu, group)
    (out * weight[held]).sum().backward()
    return held, out.detach(), *(x.grad for x in local)


def assert_matches_full_attention(results, cu, q, k, v, weight):
    """The ranks' outputs and q/k/v gradients, put back in row order, equal full attention's."""
    full = [x.clone().requires_grad_(True) for x in (q, k, v)]
    expected = full_attention(*full, cu)
    (expected * weight).sum().backward()
    got = [torch.zeros_like(q) for _ in range(4)]
    seen = []
    for held, *tensors in results:
        seen += held
        for dst, src in zip(got, tensors):
            dst[held] = src
    assert sorted(seen) == list(range(cu[-1]))  # the shards partition the row
    torch.testing.assert_close(got[0], expected.detach())
    for grad, leaf in zip(got[1:], full):
        torch.testing.assert_close(grad, leaf.grad)


@pytest.mark.parametrize("program", [allgather_kv_attention, ulysses_attention, ring_attention],
                         ids=["allgather-kv", "ulysses", "zigzag-ring"])
@pytest.mark.parametrize("cp,seed", [(1, 0), (2, 1), (2, 2), (4, 3), (4, 4)])
def test_cp_attention_matches_full_attention_outputs_and_gradients(program, cp, seed):
    cu, q, k, v, weight = random_row(seed, cp)
    results = run_spmd(cp, rank_program, program, cu, q, k, v, weight, timeout=120.0)
    assert_matches_full_attention(results, cu, q, k, v, weight)


def vision_rank(group, patches, bounds, weight, held, row_weight, padded=False):
    rank = group.rank()
    encoder = weight.clone().requires_grad_(True)
    local = patches[bounds[rank]:bounds[rank + 1]] @ encoder  # this rank's images only
    gather = attention.PaddedAllGatherVisionEmbeddings if padded else attention.AllGatherVisionEmbeddings
    full = gather.apply(local, group)
    (full[held[rank]] * row_weight[held[rank]]).sum().backward()  # this rank's tokens use some rows
    return full.detach(), encoder.grad


def vision_case(cp, seed):
    """Random patches split unevenly over the ranks (some may get none), and which rank's tokens use each row."""
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(cp, 6 * cp, (1,), generator=g))
    patches = torch.randn(rows, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 3, generator=g, dtype=torch.float64)
    row_weight = torch.randn(rows, 3, generator=g, dtype=torch.float64)
    cuts = sorted(torch.randint(0, rows + 1, (cp - 1,), generator=g).tolist())
    bounds = [0, *cuts, rows]
    owner = torch.randint(0, cp, (rows,), generator=g)  # which CP rank's tokens use each embedding row
    held = [torch.nonzero(owner == r).flatten() for r in range(cp)]
    return patches, bounds, weight, held, row_weight


def assert_vision_matches_unsharded(results, patches, bounds, weight, held, row_weight):
    expected_full = patches @ weight
    for full, _ in results:
        torch.testing.assert_close(full, expected_full)
    # the encoder's gradient summed over ranks (DP) equals the unsharded one: patches^T row_weight
    torch.testing.assert_close(sum(grad for _, grad in results), patches.T @ row_weight)


@pytest.mark.parametrize("padded", [False, True], ids=["bridge-uneven", "padded"])
@pytest.mark.parametrize("cp,seed", [(1, 0), (2, 1), (3, 2), (4, 3)])
def test_allgather_vision_embeddings_forward_and_backward_match_the_unsharded_encoder(cp, seed, padded):
    case = vision_case(cp, seed)
    results = run_spmd(cp, vision_rank, *case, padded, timeout=120.0)
    assert_vision_matches_unsharded(results, *case)
