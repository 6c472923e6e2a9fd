"""Simulate N CP ranks on one packed batch and check every rank against the oracle.

Data flows one way: batch -> layout -> per-rank local rows -> per-rank program through the
simulated group -> oracle check -> findings. :class:`Result` holds every stage as tensors, and
:meth:`Result.to_dict` is the ``--json`` document.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from cpinspect.core.audio_items import find_audio_items
from cpinspect.core.batch import PackedBatch
from cpinspect.core.errors import InputError
from cpinspect.core.findings import Finding
from cpinspect.core.hybrid import KIND as HYBRID
from cpinspect.core.hybrid import placement_note, segment_cp_sizes, with_pad_sequences
from cpinspect.core.layout import (
    Layout,
    make_layout,
    pad_multiple,
    pad_row,
    padded_boundaries,
    rule_of,
)
from cpinspect.core.layout_maps import file_layout
from cpinspect.core.oracle import expected_rows, global_positions
from cpinspect.core.parallel import check_sp_split
from cpinspect.core.rank_selection import RankSelection, select_rank_rows
from cpinspect.core.runs import mask_runs
from cpinspect.core.tokens import TokenConfig, token_config
from cpinspect.core.vision_items import batch_embedding_rows, placeholder_mask
from cpinspect.groups.simulated import DEFAULT_TIMEOUT_S, RankState, SpmdError, execute_spmd
from cpinspect.simulation.checks import check
from cpinspect.simulation.input_form import input_form

RANK_INDEX_LISTS = ("global_indices", "vision_positions", "selected_rows", "expected_rows")


@dataclass
class RankResult:
    """One simulated rank: what it holds, what it selected, and what the oracle expects."""

    rank: int
    global_indices: torch.Tensor
    input_ids: torch.Tensor
    selection: RankSelection | None
    expected_rows: torch.Tensor

    @property
    def local_mask(self) -> torch.Tensor:
        return self.selection.local_mask if self.selection else torch.zeros(0, dtype=torch.bool)

    @property
    def vision_positions(self) -> torch.Tensor:
        """Local positions of this rank's vision tokens."""
        return torch.nonzero(self.local_mask).view(-1)

    @property
    def selected_rows(self) -> torch.Tensor:
        return self.selection.rows if self.selection else torch.zeros(0, dtype=torch.long)

    @property
    def ok(self) -> bool:
        return self.selection is not None and torch.equal(self.selected_rows, self.expected_rows)


@dataclass
class Result:
    """Everything one simulation found; ``ok`` is False when any error or warning was found."""

    cp: int
    layout: Layout
    input_form: str
    full_ids: torch.Tensor
    full_mask: torch.Tensor
    tokens: TokenConfig
    ranks: list[RankResult]
    findings: list[Finding]
    vision_embed_count: int
    images: int
    videos: int
    padded_tokens: int = 0
    spmd_error: SpmdError | None = None
    notes: list[str] = field(default_factory=list)
    tp: int = 1
    sequence_parallel: bool = False

    @property
    def ok(self) -> bool:
        return not any(f.is_problem for f in self.findings)

    @property
    def vision_tokens(self) -> int:
        return int(self.full_mask.sum())

    @property
    def gathered_counts(self) -> torch.Tensor:
        """``[S, 2cp]`` (zigzag) or ``[1, pieces]``: vision tokens per piece in natural order."""
        selection = next((r.selection for r in self.ranks if r.selection is not None), None)
        if selection is None:
            return torch.zeros(0, self.layout.chunks_per_segment, dtype=torch.long)
        return selection.full_counts.view(-1, self.layout.chunks_per_segment)

    def modalities(self) -> list[dict[str, int]]:
        """Per rank, the placeholder tokens it holds of each modality (image, video, and audio for Omni presets)."""
        ids = {"image": self.tokens.image_token_id, "video": self.tokens.video_token_id}
        if self.tokens.audio_token_id is not None:
            ids["audio"] = self.tokens.audio_token_id
        return [{name: int((r.input_ids == token).sum()) for name, token in ids.items()} for r in self.ranks]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document as plain Python values."""
        document = self.document()
        for entry in document["ranks"]:
            for key in RANK_INDEX_LISTS:
                entry[key] = entry[key].tolist()
        return document

    def document(self) -> dict[str, Any]:
        """:meth:`to_dict` with each rank's long index lists (:data:`RANK_INDEX_LISTS`) left as 1-D tensors.

        On a million-token batch these lists hold millions of numbers; the CLI streams them to
        JSON a slice at a time instead of building Python lists of all of them at once.
        """
        extra: dict[str, Any] = {}
        if self.tokens.audio_token_id is not None:
            extra["modalities"] = self.modalities()
        if self.layout.segment_cp is not None:
            extra["local_cp_size"] = self.layout.segment_cp.tolist()  # hybrid CP: one per segment
        return {
            **extra,
            "cp": self.cp,
            "layout": self.layout.kind,
            "input": self.input_form,
            "tokens": self.layout.total_tokens,
            "segments": self.layout.num_segments,
            "vision_tokens": self.vision_tokens,
            "vision_embed_count": self.vision_embed_count,
            "images": self.images,
            "videos": self.videos,
            "gathered_counts": self.gathered_counts.tolist(),
            "tp": self.tp,
            "sequence_parallel": self.sequence_parallel,
            "tokens_per_tp_rank": self.layout.local_tokens // (self.tp if self.sequence_parallel else 1),
            "ranks": [
                {
                    "rank": r.rank,
                    "global_indices": r.global_indices,
                    "vision_positions": r.vision_positions,
                    "local_counts": (
                        r.selection.local_counts.view(-1, 2).tolist()
                        if r.selection is not None and self.layout.paired
                        else r.selection.local_counts.tolist() if r.selection is not None else None
                    ),
                    "selected_rows": r.selected_rows,
                    "expected_rows": r.expected_rows,
                    "ok": r.ok,
                }
                for r in self.ranks
            ],
            "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings],
        }


def simulate(
    batch: PackedBatch,
    cp: int,
    layout: str = "zigzag",
    *,
    tokens: TokenConfig | None = None,
    pad: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    backend: str = "threads",
    index_map: torch.Tensor | None = None,
    tp: int = 1,
    sequence_parallel: bool = False,
    cp_per_segment: str | None = None,
) -> Result:
    """Shard ``batch`` over ``cp`` simulated ranks, run each rank's selection, check it.

    ``backend`` is ``"threads"`` (the simulated group, one thread per rank) or ``"gloo"`` (one
    real process per rank over torch.distributed's gloo backend). ``cp_per_segment`` (``"2,2,4"``) or
    the batch's ``local_cp_size`` makes it hybrid CP (:mod:`cpinspect.core.hybrid`). Raises
    :class:`~cpinspect.core.errors.InputError` for input the layout cannot shard; reports
    inconsistencies as findings on the returned :class:`Result`.
    """
    tokens = tokens or token_config()
    sp = tp if sequence_parallel else 1
    if tp < 1:
        raise InputError(f"tp is {tp}, but it must be at least 1", where="--tp", fix="pass --tp 1 or more")
    if cp < 1:
        raise InputError(f"cp is {cp}, but it must be at least 1", where="--cp", fix="pass --cp 1 or more")
    if index_map is not None and pad:
        raise InputError("--pad cannot be combined with --layout-from: the saved indices fix the row length",
                         where="--pad", fix="save the index tensors of the padded row and drop --pad")
    form = input_form(batch, cp)
    cu = batch.cu_seqlens
    segment_cp = segment_cp_sizes(cp, batch.num_segments, option=cp_per_segment, batch_value=batch.local_cp_size,
                                  index_map=index_map)
    layout = HYBRID if segment_cp is not None else layout
    full_ids, full_mask = _full_row(batch, form, tokens)
    padded = 0
    notes: list[str] = []
    if pad:
        full_ids, full_mask, cu, padded = _pad(batch, full_ids, full_mask, cu, cp, layout, form, tokens, sp,
                                               segment_cp)
        if padded:
            unit = pad_multiple(cp, layout, sp) if segment_cp is None else "2c (its own cp), every rank one share"
            what = "every segment length" if rule_of(layout) == "zigzag" else "the row length"
            notes.append(f"padded {padded} token(s) so {what} divides {unit}"
                         + (" (2*cp*tp, as Megatron-Bridge pads under sequence parallelism)" if sp > 1 else ""))
    if index_map is not None:
        layout, plan = "file", file_layout(cu, cp, index_map)
    else:
        plan = make_layout(cu, cp, layout, segment_cp := with_pad_sequences(segment_cp, cu))
        if segment_cp is not None:
            index_map = plan.all_global_indices()  # the oracle reads positions from the map, as for "file"
            notes.append(placement_note(plan))
    check_sp_split(plan, tp, sequence_parallel)
    if tokens.audio_token_id is not None and bool((full_ids == tokens.audio_token_id).any()):
        notes.append("audio placeholders are selected and counted like image and video ones; --positions gives an "
                     "audio-only item sequential positions like text, as the Omni models do")
    if tokens.audio_token_id is not None and bool((full_ids == tokens.video_token_id).any()):
        notes.append(f"{tokens.model} video mRoPE positions (time-aligned t, audio interleaved with the video) are not "
                     "modelled: --positions shows the Qwen-VL rule for them")
    if sp > 1:
        notes.append(f"tp {tp} with sequence parallelism: each rank's {plan.local_tokens:,} tokens are scattered "
                     f"over its TP group as {tp} x {plan.local_tokens // tp:,} (the CP split first, then SP)")
    if form == "full":
        all_indices = plan.all_global_indices()
        local_ids = list(full_ids[all_indices])
        local_masks = list(full_mask[all_indices])
    else:
        local_ids = list(batch.rows)
        local_masks = [m.clone() for m in batch.vision_mask] if batch.vision_mask else [
            placeholder_mask(row, tokens) for row in local_ids
        ]
        all_indices = plan.all_global_indices()
        full_ids = torch.empty(plan.total_tokens, dtype=torch.long)
        full_ids[all_indices] = torch.stack(local_ids)
        full_mask = torch.zeros(plan.total_tokens, dtype=torch.bool)
        full_mask[all_indices] = torch.stack(local_masks)
    local_piece_len = [plan.local_piece_len(r) for r in range(cp)]
    states, failure = _executor(backend)(cp, rank_program, local_masks, local_piece_len, plan.rank_pieces, {},
                                         timeout=timeout)
    ranks = []
    oracle_kind = "file" if segment_cp is not None else layout
    for rank, (state, expected) in enumerate(zip(states, _oracle_rows(full_mask, oracle_kind, cu, cp, index_map))):
        selection = state.value if state.status == "returned" else None
        ranks.append(RankResult(rank, all_indices[rank], local_ids[rank], selection, expected))
    embed_count, images, videos = _vision_items(batch, full_mask, full_ids, cu, tokens)
    result = Result(
        cp=cp, layout=plan, input_form=form, full_ids=full_ids, full_mask=full_mask, tokens=tokens,
        ranks=ranks, findings=[], vision_embed_count=embed_count, images=images, videos=videos,
        padded_tokens=padded, spmd_error=failure, notes=notes, tp=tp, sequence_parallel=sequence_parallel,
    )
    result.findings = check(result)
    return result


def _oracle_rows(full_mask: torch.Tensor, layout: str, cu: torch.Tensor, cp: int,
                 index_map: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The oracle's rows for every rank, ranking all ranks' vision tokens in one call.

    One call over all ranks' global positions costs one pass over the row; a call per rank
    would rank the whole row ``cp`` times.
    """
    positions = torch.stack([global_positions(layout, cu, cp, rank, index_map) for rank in range(cp)])
    held = full_mask[positions].sum(1).tolist()
    return list(torch.split(expected_rows(full_mask, positions.reshape(-1)), held))


def rank_program(group: Any, local_masks: list[torch.Tensor], local_piece_len: list[torch.Tensor],
                 rank_pieces: torch.Tensor, shared: dict[str, torch.Tensor] | None = None) -> RankSelection:
    """What one CP rank runs: module-level so a process backend can pickle it.

    ``shared`` (one dict per simulation) lets ranks whose gathered tables equal the first
    finisher's keep that one copy: every rank gathers ``[cp, pieces]`` counts, so cp private
    copies would grow with cp squared. ``dict.setdefault`` is atomic, so threads need no lock.
    """
    rank = group.rank()
    selection = select_rank_rows(local_masks[rank], local_piece_len[rank], rank_pieces, group)
    return share_tables(selection, shared) if shared is not None else selection


def share_tables(selection: Any, shared: dict[str, torch.Tensor]) -> Any:
    """Point ``selection``'s count tables at the first equal ones in ``shared`` (set there if absent)."""
    for name in ("gathered", "full_counts", "offsets"):
        mine = getattr(selection, name)
        first = shared.setdefault(name, mine)
        if first is not mine and first.shape == mine.shape and torch.equal(first, mine):
            setattr(selection, name, first)
    return selection


Executor = Callable[..., tuple[list[RankState], Optional[SpmdError]]]


def _executor(backend: str) -> Executor:
    """``execute(cp, fn, *args, timeout=...) -> (rank states, failure)`` for a backend name."""
    if backend == "threads":
        return execute_spmd
    if backend == "gloo":
        from cpinspect.groups.gloo import execute_gloo

        return execute_gloo
    raise InputError(f"unknown backend {backend!r}", where="--backend", fix="use threads or gloo")


def _full_row(batch: PackedBatch, form: str, tokens: TokenConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The full row and its vision mask (an explicit mask in the batch wins over token ids)."""
    if form != "full":
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
    ids = batch.rows[0]
    mask = batch.vision_mask[0].clone() if batch.vision_mask else placeholder_mask(ids, tokens)
    return ids, mask


def _pad(batch: PackedBatch, ids: torch.Tensor, mask: torch.Tensor, cu: torch.Tensor, cp: int, layout: str,
         form: str, tokens: TokenConfig, sp: int = 1, segment_cp: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    if form != "full":
        raise InputError(
            "--pad applies to a full row; this batch is already pre-sharded, so its segments were padded (or not) "
            "before the split",
            where=batch.source,
            fix="drop --pad; if segment lengths are not divisible by 2*cp, the framework's padding is the bug",
        )
    new_cu = padded_boundaries(cu, cp, layout, sp, segment_cp)
    added = int(new_cu[-1] - cu[-1])
    if not added:
        return ids, mask, cu, 0
    if rule_of(layout) != "zigzag":
        fill = ids.new_full((added,), tokens.pad_token_id)
        return torch.cat([ids, fill]), torch.cat([mask, mask.new_zeros(added)]), new_cu, added
    return pad_row(ids, cu, new_cu, tokens.pad_token_id), pad_row(mask, cu, new_cu, False), new_cu, added


def _vision_items(batch: PackedBatch, full_mask: torch.Tensor, full_ids: torch.Tensor, cu: torch.Tensor,
                  tokens: TokenConfig) -> tuple[int, int, int]:
    """Vision embedding rows expected, and the number of images and videos."""
    audio = find_audio_items(full_ids, cu, tokens, batch)
    count = batch_embedding_rows(batch, full_mask, tokens.merge_area, audio.total_rows if audio is not None else 0)
    images = batch.image_grid_thw.shape[0] if batch.image_grid_thw is not None else _run_count(
        full_ids == tokens.image_token_id, cu)
    videos = batch.video_grid_thw.shape[0] if batch.video_grid_thw is not None else _run_count(
        full_ids == tokens.video_token_id, cu)
    return count, images, videos


def _run_count(mask: torch.Tensor, cu: torch.Tensor) -> int:
    return int(mask_runs(mask, cu)[0].numel())
