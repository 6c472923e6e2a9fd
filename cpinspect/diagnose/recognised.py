"""Error texts whose cause the batch may not show: tie their numbers to this batch, or say what would.

Each form is recognised (issue 14, class 8). Where the batch can show the cause, the numbers are
compared with it (a confirmed finding only on an equality); where it cannot, ERROR_RECOGNISED says
what the error means and which input would show it (which file, which key, which command). A
recognised failure exits 1 either way: "nothing wrong found" is never printed for it.
"""

from __future__ import annotations

from cpinspect.core.findings import Finding
from cpinspect.diagnose.errortext import ObservedError
from cpinspect.diagnose.report import cause
from cpinspect.diagnose.rope_offsets import segment_offset_findings
from cpinspect.diagnose.scene import Scene

RECOGNISED = "ERROR_RECOGNISED"
KINDS = ("bridge_divisible", "bridge_offset", "bridge_mask_length", "bridge_mrope", "cp_group", "view_size",
         "dim_range", "gloo_mismatch", "nccl_timeout", "audio_count")


def recognised(code_hint: str, meaning: str, would_show: str) -> Finding:
    """A recognised failure this batch cannot show: severity error (exit 1), status info (not a cause)."""
    return Finding(RECOGNISED, "error", f"{meaning}; this batch cannot show it: {would_show}", code_hint,
                   status="info")


def explain_recognised(scene: Scene, observed: ObservedError, findings: list[Finding]) -> list[Finding]:
    kind = observed.kind
    codes = {f.code for f in findings if f.status == "confirmed"}
    cp, total = scene.cp, scene.total_tokens
    if kind == "bridge_divisible":
        if "SEGMENT_NOT_DIVISIBLE" in codes:
            return []
        lengths = (scene.cu[1:] - scene.cu[:-1]).tolist()
        return [recognised(
            "pad every physical segment to a multiple of 2·cp before CP and pass cu_seqlens_padded",
            f"Megatron-Bridge's pre-sharded check: a physical segment length is not a multiple of 2·cp; here all "
            f"{len(lengths)} segment(s) divide 2·cp = {2 * cp} at --cp {cp}",
            "the failing step's rank files with the physical boundaries (key cu_seqlens_padded) and the run's cp: "
            "cpinspect diagnose RANK_DIR --cp <the run's cp> --error-file train.log")]
    if kind == "bridge_offset":
        return [recognised(
            "rebase the boundaries of a sliced pack (cu_seqlens - cu_seqlens[0]) before building PackedSeqParams",
            f"Megatron-Bridge's pre-sharded check: the packed-sequence metadata does not start at token 0 (a slice of "
            f"a larger pack, not rebased); this batch's cu_seqlens start at {int(scene.cu[0])}",
            "the PackedSeqParams the model received (keys cu_seqlens_q and cu_seqlens_q_padded, saved next to "
            "input_ids in each rank file): cpinspect diagnose RANK_DIR --cp N")]
    if kind == "bridge_mask_length":
        return [recognised(
            "build the vision mask from the same input_ids the metadata describes (rank-local: cu_seqlens[-1] / cp)",
            f"Megatron-Bridge's pre-sharded check: the vision mask's length is neither the packed length nor the "
            f"rank-local one; here cu_seqlens ends at {total}, i.e. {total // cp} per rank at cp={cp}",
            "each rank's vision_mask as the model received it (key vision_mask in each rank file): cpinspect "
            "diagnose RANK_DIR --cp N")]
    if kind == "bridge_mrope":
        if scene.batch.position_ids:
            return []  # the position check of the batch's own position_ids reports what is wrong with them
        return [recognised(
            "compute [3, 1, T] mRoPE positions per segment on the full row (get_rope_index) and slice them with the "
            "layout's indices for each rank",
            "Megatron-Bridge's pre-sharded path needs every rank's 3-D mRoPE position_ids ([3, 1, T/cp]); this batch "
            "carries no position_ids",
            "save position_ids in each rank file (key position_ids), then cpinspect diagnose RANK_DIR --cp N "
            "checks them against the full row's positions")]
    if kind == "cp_group":
        return _cp_group(observed)
    if kind == "view_size":
        return [_view_size(scene, observed)]
    if kind == "dim_range":
        return [recognised(
            "packed THD batches need no attention mask: pass attention_mask=None (or a [1, T] mask), not a [1]-shaped "
            "tensor",
            f"a 1-D tensor indexed on dim {observed.get('dim')}: the expected range [-1, 0] means the tensor has one "
            "dim, as a [1]-shaped attention mask where [B, T] is expected (Megatron-Bridge#4228)",
            "the attention_mask the model received (key attention_mask) and its shape")]
    if kind == "gloo_mismatch":
        sent, expected = observed.get("sent_bytes") or 0, observed.get("expected_bytes") or 0
        return [recognised(
            "every rank must enter the same collectives with the same sizes: cpinspect check module:fn --cp N finds "
            "where the ranks part",
            f"gloo received a message of {sent} bytes where the collective expected {expected} ({sent // 8} vs "
            f"{expected // 8} int64 values): the ranks entered different collectives, or the same one with "
            "different sizes; one rank aborts, the others may return",
            "the per-rank program: cpinspect check your_module:select_rows --cp N, or cpinspect simulate BATCH "
            "--cp N --backend gloo")]
    if kind == "nccl_timeout":
        if codes & {"VISION_DP_EMPTY_RANK_SKIPS_COLLECTIVE", "COLLECTIVE_DIVERGENCE"}:
            return []  # the simulation shows the hang itself
        return [_nccl(scene, observed)]
    if kind == "audio_count":
        return [recognised(
            "pass the audio encoder exactly the features of the audio items in this packed row",
            f"audio placeholders ({observed.get('tokens')}) and audio encoder rows ({observed.get('rows')}) differ; "
            f"this batch cannot test it under --model {scene.tokens.model} (no audio placeholders in the row, or one "
            "rank's row without the items' lengths)"
            if observed.get("tokens") is not None else "the audio placeholders and the audio encoder's rows differ "
            "(the error names no numbers)",
            "the failing step's batch with its audio_feature_lengths (or feature_attention_mask), the error line "
            "with both numbers, and --model qwen3-omni or qwen2.5-omni")]
    return []


def _cp_group(observed: ObservedError) -> list[Finding]:
    size, wanted = observed.get("group_size"), observed.get("requested_size")
    rank, wanted_rank = observed.get("group_rank"), observed.get("requested_rank")
    if size is not None and wanted is not None and size != wanted:
        return [cause(
            "CP_SIZE_MISMATCH",
            f"the context-parallel process group has {size} ranks, but the inputs were prepared for cp={wanted} "
            f"(the error's own numbers: size {size} != {wanted}): the batch was sharded (or the config set) for "
            "another cp than the one the job runs with",
            f"shard for cp={size}, or run with context_parallel_size={wanted} (cpinspect: --cp {size})")]
    return [recognised(
        "pass the CP group's own rank (torch.distributed.get_rank(cp_group)), not the global rank",
        f"the CP group has size {size} as requested, but its rank is {rank} where {wanted_rank} was requested: a "
        "global or data-parallel rank used as the CP rank",
        "each rank's file with its CP rank and the global rank it came from")]


def _view_size(scene: Scene, observed: ObservedError) -> Finding:
    numbers = observed.numbers
    shape, size = list(numbers.get("shape", [])), int(numbers.get("size", 0))
    total, cp = scene.total_tokens, scene.cp
    known = {total: "the full row's tokens", total // max(cp, 1): "one rank's tokens",
             3 * total: "3 x the full row (a [3, T] mRoPE table)",
             3 * (total // max(cp, 1)): "3 x one rank's tokens (a rank-local [3, T/cp] table)"}
    product = 1
    for dim in shape:
        product *= dim if dim > 0 else 1
    has = known.get(size)
    wants = known.get(product)
    meaning = (f"a view of shape {shape} ({product} elements) of a tensor of {size} elements: the RoPE/mRoPE table "
               "was sliced for other tokens than the ones it is viewed for (Pai-Megatron-Patch#569)")
    if has and wants:
        meaning += f"; on this batch {size} = {has} and {product} = {wants}"
    elif (tokens := _token_dims(shape, size, {total: "the full row's", total // max(cp, 1): "one rank's"})):
        meaning += f"; on this batch {tokens}"
        has = wants = tokens
    offset_bug = [f for f in segment_offset_findings(scene) if f.status == "confirmed"]
    if offset_bug:  # the batch's own positions show a selection mistake: tie the sizes to it, never "cannot show"
        n = scene.batch.row_tokens
        return Finding(RECOGNISED, "error", (
            f"{meaning}. This batch's own position_ids show ROPE_SEGMENT_OFFSET_MISSING (its own finding): a table "
            f"selected without the segment offsets still has one entry per local token ({n} per rank, {3 * n} as "
            f"[3, {n}]), so that mistake alone changes no size: the view's {product} elements against {size} point "
            "to a second slicing of the table with other indices than input_ids"
            + ("" if has or wants else f" ({size} and {product} are no size of this batch's rows)")),
            "fix the segment offsets first (ROPE_SEGMENT_OFFSET_MISSING), then slice the table once, with the layout "
            "indices input_ids were sliced with", status="info")
    return recognised("slice the position/RoPE table with the same layout indices as input_ids, after computing it "
                      "on the full row", meaning,
                      "the batch's own position_ids in each rank file (key position_ids): cpinspect diagnose "
                      "RANK_DIR --cp N compares them with the full row's")


def _token_dims(shape: list[int], size: int, counts: dict[int, str]) -> str:
    """``the view wants 132 tokens x 64 (the full row's), the tensor holds 4224 = 66 x 64 (one rank's)``, or ''."""
    for axis, dim in enumerate(shape):
        if dim not in counts:
            continue
        width = 1
        for other, value in enumerate(shape):
            width *= value if other != axis and value > 0 else 1
        if width and size % width == 0 and size // width in counts and size // width != dim:
            held = size // width
            return (f"the view wants {dim} tokens x {width} ({counts[dim]} tokens), the tensor holds {size} = {held} "
                    f"x {width} ({counts[held]} tokens)")
    return ""


def _nccl(scene: Scene, observed: ObservedError) -> Finding:
    op, numel_in, numel_out = observed.numbers.get("op"), observed.get("numel_in"), observed.get("numel_out")
    segments = scene.batch.num_segments
    meaning = f"an NCCL collective ({op}, #{observed.get('seq')}) never completed: some rank did not enter it"
    if numel_in and numel_out:
        meaning += f"; NumelOut / NumelIn = {numel_out} / {numel_in} = {numel_out / numel_in:g} ranks"
        if op == "ALLGATHER" and numel_in == 2 * segments:
            meaning += (f", and NumelIn = {numel_in} = 2 x the batch's {segments} segments: the CP vision-count "
                        "all-gather (each rank sends its 2 chunk counts per segment)")
    return recognised("every CP rank must enter the same collectives: a rank with no vision item must still take "
                      "part (see simulate --vision-dp), and no rank may skip the count all-gather",
                      meaning, "every rank's file of the step and the selection program: cpinspect simulate "
                               "RANK_DIR --cp N --vision-dp, or cpinspect check module:fn --cp N")
