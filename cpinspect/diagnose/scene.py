"""The scene a diagnosis compares against, built once from the batch and ``cp``.

Resolving the form (a full row, every rank's pre-sharded row, or one rank's row) may itself find
the cause: rows cut for another cp (CP_SIZE_MISMATCH), logical boundaries stored where physical
ones belong (LOGICAL_CU_AS_PHYSICAL), pre-sharded rows cut with another layout (LAYOUT_MISMATCH).
Anything that fits no form, or cannot be a Qwen-VL batch at all, is an exit-2 input error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from cpinspect.core.batch import PackedBatch, check_grid_merge, row_cut_for
from cpinspect.core.errors import InputError
from cpinspect.core.findings import Finding
from cpinspect.core.hybrid import KIND as HYBRID
from cpinspect.core.hybrid import segment_cp_sizes
from cpinspect.core.layout import check_cp_fits, make_layout, padded_cu_seqlens
from cpinspect.core.loading import stacked_shape
from cpinspect.core.tokens import TokenConfig
from cpinspect.core.vision_items import VisionItem, embedding_rows, expected_items, placeholder_mask
from cpinspect.diagnose.data_layout import choose_data_layout, try_layout
from cpinspect.diagnose.double_sharded import double_sharded_finding
from cpinspect.diagnose.report import cause
from cpinspect.diagnose.spans import (
    Runs,
    SpanIssue,
    align_spans,
    content_ends,
    find_runs,
    placeholder_candidates,
)
from cpinspect.diagnose.valid_only import valid_only_finding
from cpinspect.simulation.run import Result, simulate

# The largest embedding table of the Qwen2/2.5/3-VL checkpoints (Qwen2-VL-7B and Qwen2.5-VL-7B
# config.json: vocab_size 152064; the 2B/3B ones have 151936): an id at or above it is out of vocab.
MAX_VOCAB_ROWS = 152064


@dataclass
class Scene:
    """Everything the audits and hypotheses compare against, computed once.

    ``form`` is ``full``, ``presharded`` (every rank's row) or ``one rank``; ``cp`` is the cp the
    rows were cut for (``requested_cp`` is what the caller said). ``full_ids``/``full_mask`` are the
    whole row (reassembled for pre-sharded input) and ``result`` the core simulation on it.
    ``data_layout`` is how the data was cut (pre-sharded rows are tested for it); ``layout`` is
    what the model assumes.
    """

    batch: PackedBatch
    cp: int
    requested_cp: int
    layout: str
    tokens: TokenConfig
    form: str
    rank: int | None
    embeds: int | None
    data_layout: str = "zigzag"
    full_ids: torch.Tensor | None = None
    full_mask: torch.Tensor | None = None
    result: Result | None = None
    one_rank_held: int | None = None
    stacked: tuple[int, int] | None = None
    divisible: bool = True
    items: dict[str, list[VisionItem]] = field(default_factory=dict)
    runs: dict[str, Runs] = field(default_factory=dict)
    issues: dict[str, list[SpanIssue]] = field(default_factory=dict)
    foreign: dict[str, list[int]] = field(default_factory=dict)
    spans_intact: bool = False  # pre-sharded rows reassembled under data_layout gave whole vision spans
    tp: int | None = None  # the run's tensor-parallel size and sequence parallelism, when the user gave them
    sequence_parallel: bool | None = None
    segment_cp: torch.Tensor | None = None  # hybrid CP: the batch's local_cp_size, one per segment
    _held: dict[tuple[str, int], list[int] | None] = field(default_factory=dict)

    @property
    def cu(self) -> torch.Tensor:
        return self.batch.cu_seqlens

    @property
    def total_tokens(self) -> int:
        return int(self.cu[-1])

    @property
    def placeholders(self) -> int | None:
        """Vision tokens of the full row (V), or None when only one rank's row is known."""
        return int(self.full_mask.sum()) if self.full_mask is not None else None

    def mask_from_ids(self) -> bool:
        """True when the vision positions are the placeholder ids' (no explicit mask, or one equal to them)."""
        if not self.batch.vision_mask or self.full_ids is None or self.full_mask is None:
            return True
        return bool(torch.equal(self.full_mask, placeholder_mask(self.full_ids, self.tokens)))

    def placeholders_of(self, kind: str) -> int | None:
        if self.full_ids is None:
            return None
        token_id = self.tokens.image_token_id if kind == "image" else self.tokens.video_token_id
        return int((self.full_ids == token_id).sum())

    def grid_rows(self, kind: str | None = None) -> int | None:
        """Σ t·h·w/merge² of the grids (one kind or both), or None without grids."""
        kinds = [kind] if kind else ["image", "video"]
        grids = [self._grid(k) for k in kinds]
        if all(g is None for g in grids):
            return None
        return embedding_rows(grids, self.tokens.merge_area)

    def _grid(self, kind: str) -> torch.Tensor | None:
        return self.batch.image_grid_thw if kind == "image" else self.batch.video_grid_thw

    def embed_rows(self) -> tuple[int | None, str]:
        """Rows the encoder makes (E): ``embeds`` > ``vision_embed_count`` > grids, with their label."""
        explicit = ((self.embeds, "--embeds") if self.embeds is not None else
                    (self.batch.vision_embed_count, "vision_embed_count"))
        if explicit[0] is not None:  # the vision encoder's rows; audio placeholders (Omni) are the audio encoder's
            audio = self.audio_placeholders()
            return (explicit[0] + audio, f"{explicit[1]} + {audio} audio placeholders") if audio else explicit
        grid = self.grid_rows()
        if grid is not None:
            audio = self.audio_placeholders()
            if audio:  # one row per audio placeholder here: diagnose/audio.py checks the audio rows per item
                return grid + audio, f"Σ t·h·w/4 of the grids + {audio} audio placeholders; audio rows: by modality"
            return grid, "Σ t·h·w/4 of the grids"
        return self.placeholders, "one row per placeholder (no grids in the batch)"

    def audio_placeholders(self) -> int:
        """Audio placeholder tokens of the full row (Omni presets), one encoder row each."""
        if self.full_ids is None or self.tokens.audio_token_id is None:
            return 0
        return int((self.full_ids == self.tokens.audio_token_id).sum())

    def held(self, kind: str, cp: int) -> list[int] | None:
        """Vision tokens each rank holds when the full row is cut with ``kind`` over ``cp`` ranks."""
        if (kind, cp) not in self._held:
            self._held[(kind, cp)] = _held_counts(self, kind, cp)
        return self._held[(kind, cp)]

    def actual_held(self) -> dict[int, int]:
        """What each rank really holds: from the files when pre-sharded, else the data layout."""
        if self.form == "one rank":
            return {self.rank if self.rank is not None else -1: self.one_rank_held or 0}
        if self.form == "double sharded":
            return {r: int(self._local_mask(r).sum()) for r in range(len(self.batch.rows))}
        counts = self.held(self.data_layout, self.cp)
        if counts is None and self.form == "presharded":
            counts = [int(self._local_mask(r).sum()) for r in range(len(self.batch.rows))]
        return dict(enumerate(counts)) if counts is not None else {}

    def _local_mask(self, rank: int) -> torch.Tensor:
        if self.batch.vision_mask:
            return self.batch.vision_mask[rank]
        return placeholder_mask(self.batch.rows[rank], self.tokens)

    def locate(self, position: int) -> tuple[int | None, int | None, int | None]:
        """(rank, segment, chunk) of a global token position under the model's layout at ``cp``."""
        plan = try_layout(self.cu, self.cp, self.layout, self.segment_cp)
        if plan is None or position >= plan.total_tokens:
            return None, int(torch.searchsorted(self.cu[1:], torch.tensor(position), right=True)), None
        place = plan.locate_position(position)
        return place.rank, place.segment, place.chunk

    @property
    def sim_cu(self) -> torch.Tensor:
        return self.result.layout.cu_seqlens if self.result is not None else self.cu

    @property
    def sim_mask(self) -> torch.Tensor | None:
        return self.result.full_mask if self.result is not None else self.full_mask


def _held_counts(scene: Scene, kind: str, cp: int) -> list[int] | None:
    mask = scene.sim_mask
    if mask is None:
        return None
    plan = try_layout(scene.sim_cu, cp, kind, scene.segment_cp if cp == scene.cp else None)
    if plan is None:
        return None
    return mask[plan.all_global_indices()].sum(dim=1).tolist()


def build_scene(batch: PackedBatch, cp: int, layout: str, tokens: TokenConfig, *, embeds: int | None = None,
                rank: int | None = None, timeout: float = 10.0) -> tuple[Scene, list[Finding]]:
    """Resolve the batch's form for ``cp``, validate it, and simulate it where it can be simulated."""
    stacked = stacked_shape(batch)
    form, cp_eff, batch, findings = resolve_form(batch, cp, tokens)
    _validate_ids(batch, tokens)
    _validate_grids(batch, tokens)
    if rank is not None and rank >= cp_eff:
        raise InputError(f"--rank {rank} is out of range: the rows were cut for cp={cp_eff}", where="--rank",
                         fix=f"pick 0..{cp_eff - 1}")
    segment_cp = segment_cp_sizes(cp_eff, batch.num_segments, batch_value=batch.local_cp_size)
    if segment_cp is not None:  # the batch says how it was cut: hybrid CP; a cut it cannot make is exit 2
        layout = make_layout(batch.cu_seqlens, cp_eff, HYBRID, segment_cp).kind
    scene = Scene(batch, cp_eff, cp, layout, tokens, form, rank, embeds, data_layout=layout, stacked=stacked,
                  segment_cp=segment_cp)
    if form == "full" and segment_cp is None:
        check_cp_fits(batch.cu_seqlens, cp_eff, layout)
    scene.divisible = try_layout(batch.cu_seqlens, cp_eff, layout, segment_cp) is not None
    if form == "double sharded":
        return scene, findings
    if form == "one rank":
        row = batch.rows[0]
        scene.one_rank_held = int((batch.vision_mask[0] if batch.vision_mask else placeholder_mask(row, tokens)).sum())
        return scene, findings
    if form == "presharded" and scene.divisible and segment_cp is None:
        findings += choose_data_layout(scene)
    if form == "full" or scene.divisible:
        pad = form == "full" and not scene.divisible
        scene.result = simulate(batch, cp_eff, scene.data_layout, tokens=tokens, pad=pad, timeout=timeout)
        scene.full_ids, scene.full_mask = _unpadded_row(scene)
        _analyse_spans(scene)
    return scene, findings


def _unpadded_row(scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """The full row as the batch holds it (without simulate's --pad padding)."""
    if scene.form == "full":
        ids = scene.batch.rows[0]
        mask = scene.batch.vision_mask[0] if scene.batch.vision_mask else placeholder_mask(ids, scene.tokens)
        return ids, mask
    assert scene.result is not None
    return scene.result.full_ids, scene.result.full_mask


def resolve_form(batch: PackedBatch, cp: int, tokens: TokenConfig) -> tuple[str, int, PackedBatch, list[Finding]]:
    """``(form, cp the rows were cut for, batch with physical cu_seqlens, findings)``.

    Rows cut for another cp give CP_SIZE_MISMATCH; stored boundaries that are logical (padding the
    segments to multiples of 2·cp makes them fit) give LOGICAL_CU_AS_PHYSICAL; anything else that
    fits no form is an exit-2 error with both numbers.
    """
    total, n, files = batch.total_tokens, batch.row_tokens, len(batch.rows)
    if batch.is_full:
        return "full", cp, batch, []
    logical = batch.logical_cu_seqlens
    if files == 1 and logical is not None and int(logical[-1]) == n and cp > 1:
        found = valid_only_finding((logical[1:] - logical[:-1]).tolist(),
                                   (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist(), cp)
        if found is not None:  # a valid-only row: the model cuts it at the padded bounds
            return "full", cp, dataclasses.replace(batch, cu_seqlens=logical, logical_cu_seqlens=None), [found]
    form = "presharded" if files > 1 else "one rank"
    cut_for = batch.cut_for()
    if cut_for is not None and batch.form_for(cut_for) == "presharded":
        return form, cut_for, batch, _cp_size_finding(cut_for, cp, total, n, files)
    if files > 1 and files == cp and row_cut_for(total, n) == cp * cp:
        doubled = double_sharded_finding(batch.cu_seqlens, cp, batch.rows, tokens, "zigzag")
        if doubled is not None:
            return "double sharded", cp, batch, [doubled]
    if files > 1 and (rows_cut := row_cut_for(total, n)) is not None and rows_cut > files:
        raise InputError(
            f"{files} rank files were given, but the rows were cut for cp={total // n} (cu_seqlens ends at {total} = "
            f"{total // n} x {n} local tokens)", where=batch.source,
            fix=f"add the missing rank files (ranks {files}..{total // n - 1})")
    for k, wanted, fixed_form in _logical_candidates(files, cp, n):
        padded = padded_cu_seqlens(batch.cu_seqlens, 2 * k)
        if int(padded[-1]) == wanted:
            fixed = dataclasses.replace(batch, cu_seqlens=padded, logical_cu_seqlens=batch.cu_seqlens)
            return fixed_form, k, fixed, [_logical_form_finding(batch, padded, k, n, files)] + _cp_size_finding(
                k, cp, wanted, n, files if fixed_form != "full" else 0)
    raise _neither(batch, cp)


def _logical_candidates(files: int, cp: int, n: int) -> list[tuple[int, int, str]]:
    if files > 1:
        return [(files, files * n, "presharded")]
    return [(cp, n, "full"), (cp, cp * n, "one rank")] if cp > 1 else [(1, n, "full")]


def _cp_size_finding(cut_for: int, cp: int, total: int, n: int, files: int) -> list[Finding]:
    if cut_for == cp or not files:
        return []
    what = f"{files} rank files" if files > 1 else "this rank's row"
    return [cause(
        "CP_SIZE_MISMATCH",
        f"the rows were cut for cp={cut_for}, not cp={cp}: {what} of {n} tokens with cu_seqlens ending at {total} = "
        f"{cut_for} x {n}; a model at cp={cp} expects {total} / {cp} = {total / cp:g} tokens per rank, so its "
        f"pre-sharded test (cu_seqlens[-1] == cp x local length) fails and the ranks disagree on every boundary",
        f"run the model with context_parallel_size={cut_for} (cpinspect: --cp {cut_for}), or re-shard the data for "
        f"cp={cp}")]


def _logical_form_finding(batch: PackedBatch, padded: torch.Tensor, k: int, n: int, files: int) -> Finding:
    logical = batch.cu_seqlens
    lengths, padded_lengths = logical[1:] - logical[:-1], padded[1:] - padded[:-1]
    seg = int(torch.nonzero(lengths != padded_lengths)[0])
    total, fitted = int(logical[-1]), int(padded[-1])
    rows = f"the {files} rank rows hold {n} tokens each" if files > 1 else f"the row holds {n} tokens"
    test = (f"a model given them fails the pre-sharded test cu_seqlens[-1] == cp x local length ({total} != {k} x "
            f"{n}) and treats each local row as a full one" if files > 1 or fitted != n else
            "a model given them partitions at the wrong offsets (every segment after the first padded one shifts)")
    return cause(
        "LOGICAL_CU_AS_PHYSICAL",
        f"cu_seqlens ends at {total}, but {rows}; padded per segment to multiples of 2·cp = {2 * k}, the same "
        f"boundaries end at exactly {fitted}: they are the logical (real-length) boundaries of physically padded "
        f"segments (segment {seg}: {int(lengths[seg])} real tokens in {int(padded_lengths[seg])}); {test}",
        "store the physical boundaries as cu_seqlens_padded (PackedSeqParams.cu_seqlens_q_padded) next to the "
        "logical cu_seqlens: CP partitioning and the pre-sharded test use the physical ones", segment=seg)


def _neither(batch: PackedBatch, cp: int) -> InputError:
    total, n = int(batch.cu_seqlens[-1]), batch.row_tokens
    rows = f"{len(batch.rows)} per-rank rows of" if batch.per_rank_files else "a row of"
    return InputError(
        f"cu_seqlens ends at {total}, but the batch has {rows} {n} tokens: that is neither a full row "
        f"(cu_seqlens[-1] == {n}) nor a row pre-sharded for cp={cp} (cu_seqlens[-1] == {cp} x {n} = {cp * n})",
        where=f"{batch.source}, cu_seqlens[-1]",
        fix="check that input_ids and cu_seqlens come from the same batch and step; if the segments were padded, "
            "store the padded boundaries as cu_seqlens_padded")


def _validate_ids(batch: PackedBatch, tokens: TokenConfig) -> None:
    if batch.row_tokens == 0:
        raise InputError("input_ids holds no tokens (an empty row)", where=f"{batch.source}, key "
                         f"{batch.keys.get('input_ids', 'input_ids')}", fix="save the packed micro-batch that failed")
    bound = max(MAX_VOCAB_ROWS, tokens.image_token_id + 1, tokens.video_token_id + 1)
    for rank, row in enumerate(batch.rows):
        if row.numel() == 0 or int(row.max()) < bound:
            continue
        position = int(torch.nonzero(row >= bound)[0])
        where = f"{batch.source}, rank {rank} file" if batch.per_rank_files else batch.source
        raise InputError(
            f"input_ids holds token id {int(row[position])} at position {position}, beyond the {bound} rows of the "
            f"largest Qwen-VL embedding table (vocab_size {MAX_VOCAB_ROWS})",
            where=f"{where}, key {batch.keys.get('input_ids', 'input_ids')}, position {position}",
            fix="the ids were produced by another tokenizer or are corrupt; re-tokenize with the model's processor")


def _validate_grids(batch: PackedBatch, tokens: TokenConfig) -> None:
    for key in ("image_grid_thw", "video_grid_thw"):
        check_grid_merge(getattr(batch, key), key, tokens.spatial_merge_size,
                         where=f"{batch.source}, key {batch.keys.get(key, key)}")


def _analyse_spans(scene: Scene) -> None:
    """Placeholder runs against the grids, per kind, and foreign ids that fit the grids instead."""
    assert scene.full_ids is not None
    ids, tokens = scene.full_ids, scene.tokens
    ends = content_ends(ids, scene.cu, scene.batch.logical_cu_seqlens, tokens.pad_token_id)
    configured = {tokens.image_token_id, tokens.video_token_id, tokens.pad_token_id}
    for kind, token_id in (("image", tokens.image_token_id), ("video", tokens.video_token_id)):
        items = expected_items(scene._grid(kind), kind, tokens)
        runs = find_runs(ids == token_id, scene.cu, ends)
        scene.items[kind], scene.runs[kind] = items, runs
        has_grids = scene.batch.image_grid_thw is not None or scene.batch.video_grid_thw is not None
        scene.issues[kind] = align_spans(items, runs) if has_grids else []
        if scene.issues[kind] and items:
            scene.foreign[kind] = placeholder_candidates(ids, scene.cu, items, configured)
