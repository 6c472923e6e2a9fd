"""Issue 14 class 8: every error text parses verbatim, under torchrun prefixes and inside log noise."""

import pytest

from cpinspect.diagnose.errortext import parse_error_text

FORMS = [
    ("ValueError: Pre-sharded packed CP inputs require every physical segment length to be divisible by 2 * cp_size.",
     "bridge_divisible", {}),
    ("ValueError: Pre-sharded packed CP metadata must start at token offset 0.", "bridge_offset", {}),
    ("ValueError: Pre-sharded packed CP vision mask length does not match the global packed-sequence metadata.",
     "bridge_mask_length", {}),
    ("ValueError: Packed CP ranks contain 129 vision tokens, but the vision encoder produced 124 embeddings.",
     "gathered_count", {"tokens": 129, "rows": 124}),
    ("ValueError: Pre-sharded packed CP inputs require explicit rank-local 3D MRoPE position_ids.",
     "bridge_mrope", {}),
    ("RuntimeError: Context-parallel group has rank 1 and size 2, but rank 1 and size 4 were requested.",
     "cp_group", {"group_rank": 1, "group_size": 2, "requested_rank": 1, "requested_size": 4}),
    ("RuntimeError: Sizes of tensors must match except in dimension 1. Expected size 84 but got size 42 for tensor "
     "number 1 in the list.", "cat_sizes", {"dim": 1, "expected": 84, "got": 42}),
    ("RuntimeError: shape '[3, 1, 2048]' is invalid for input of size 12288", "view_size",
     {"shape": [3, 1, 2048], "size": 12288}),
    ("RuntimeError: shape '[-1, 128, 64]' is invalid for input of size 1000", "view_size",
     {"shape": [-1, 128, 64], "size": 1000}),
    ("IndexError: Dimension out of range (expected to be in range of [-1, 0], but got 1)", "dim_range",
     {"low": -1, "high": 0, "dim": 1}),
    ("ValueError: Packed sequence length 4551 must be divisible by 2 * CP size 1", "not_divisible",
     {"length": 4551, "cp": 1}),
    ("AssertionError: CP rank 1 has 4096 tokens, expected 2048 from cu_seqlens", "rank_tokens",
     {"cp_rank": 1, "got": 4096, "expected": 2048}),
    ("ValueError: token/features mismatch: 1200 tokens, 1196 features", "token_features",
     {"tokens": 1200, "rows": 1196}),
    ("ValueError: Audio features and audio tokens do not match: tokens: 750, features 748", "audio_count",
     {"tokens": 750, "rows": 748}),
    ("ValueError: Audio features and audio tokens do not match", "audio_count", {}),
    ("terminate called after throwing an instance of 'gloo::EnforceNotMet'\n  what():  [enforce fail at "
     "../third_party/gloo/gloo/transport/tcp/pair.cc:446] op.preamble.length <= op.nbytes. 24 vs 16",
     "gloo_mismatch", {"sent_bytes": 24, "expected_bytes": 16}),
    ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=412, OpType=ALLGATHER, NumelIn=8, "
     "NumelOut=16, Timeout(ms)=600000) ran for 600008 milliseconds before timing out.", "nccl_timeout",
     {"seq": 412, "op": "ALLGATHER", "numel_in": 8, "numel_out": 16}),
    ("RuntimeError: The expanded size of the tensor (2) must match the existing size (0) at non-singleton "
     "dimension 0.  Target sizes: [2].  Tensor sizes: [0]", "expanded_size", {"target": 2, "existing": 0}),
]
NOISE_BEFORE = ("W1201 10:00:01.123 torch/distributed/run.py:792] Setting OMP_NUM_THREADS environment variable\n"
                "step 17 | loss 1.42 | lr 2.0e-5\n[rank0]: Traceback (most recent call last):\n")
NOISE_AFTER = "\n[rank0]:[W1201 10:00:02 ProcessGroupNCCL.cpp:1250] destroy_process_group() was not called\n"


@pytest.mark.parametrize("text, kind, numbers", FORMS)
def test_verbatim(text, kind, numbers):
    observed = parse_error_text(text)
    assert observed is not None and observed.kind == kind
    assert {k: observed.numbers[k] for k in numbers} == numbers


@pytest.mark.parametrize("prefix, rank", [("[rank3]: ", 3), ("[default1]:", 1), ("[rank2]:[E1201 10:00:00] ", 2)])
@pytest.mark.parametrize("text, kind, numbers", FORMS)
def test_with_a_rank_prefix_and_log_noise(text, kind, numbers, prefix, rank):
    lines = text.splitlines()
    log = NOISE_BEFORE + "\n".join(lines[:-1] + [prefix + lines[-1]]) + NOISE_AFTER
    observed = parse_error_text(log)
    assert observed is not None and observed.kind == kind and observed.rank == rank
    assert {k: observed.numbers[k] for k in numbers} == numbers
    assert observed.line_number == NOISE_BEFORE.count("\n") + len(lines)
