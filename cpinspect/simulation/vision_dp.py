"""Vision data parallelism under CP (Megatron-Bridge ``vision_dp_when_cp``), simulated end to end.

Instead of every CP rank encoding every image, the vision items are split over the CP ranks by
count (``n // cp`` each, the first ``n % cp`` ranks one more; Qwen3-VL splits videos into one item
per temporal patch first), each rank encodes its items, and the merged-token embeddings are
all-gathered back. Because each rank's items are a contiguous run of the natural order, the
concatenation of the gathered parts is the natural order again, which is what the per-rank row
selection assumes. Backward all-reduces the gradient of the gathered rows over the group and each
rank keeps its own rows; a rank whose zero-row placeholder does not require grad skips that
collective and the others hang (Megatron-Bridge #4784).

Each simulated embedding row carries its natural row index, so where a row ends up is checked,
not assumed. A batch may describe its own run with extra keys: ``vision_dp_ranks`` ``[N]`` (the
rank that encoded each item), ``vision_requires_grad`` (``[cp]`` or a scalar per rank file) and
``deepstack_rows`` (``[cp, K]`` or ``[K]`` per rank file: rows of each deepstack feature a rank
passed to its decoder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from cpinspect.core.batch import PackedBatch
from cpinspect.core.errors import InputError
from cpinspect.core.findings import Finding
from cpinspect.core.vision_items import VIDEO, VisionItems, find_vision_items
from cpinspect.groups.simulated import DEFAULT_TIMEOUT_S, RankState, SpmdError, execute_spmd
from cpinspect.simulation.run import Result
from cpinspect.simulation.vision_dp_split import (
    VISION_DP_RANKS_KEY,
    RankDP,
    RunCount,
    VisionDPPlan,
    plan_vision_dp,
    run_count,
    vision_dp_rank_program,
)

REQUIRES_GRAD_KEY = "vision_requires_grad"
DEEPSTACK_ROWS_KEY = "deepstack_rows"
PLACEHOLDER_KEY = "vision_dp_placeholder"  # [cp] or a scalar per rank file: empty ranks encode a 1x1 image
PLACEHOLDER_PATCHES = 4  # one merge window (2x2 patches): the smallest image the encoder takes, one merged row
DEEPSTACK_LAYERS = 3  # Qwen3-VL deepstack_visual_indexes [8, 16, 24]


# --------------------------------------------------------------------------- simulate --vision-dp


@dataclass
class RankView:
    """One rank's part of the vision-DP view."""

    rank: int
    items: list[str]
    patches: int
    rows: int
    natural_rows: torch.Tensor
    collectives: list[str]
    state: str
    grad_ok: bool | None = None
    run_count: RunCount | None = None


@dataclass
class VisionDPExtension:
    """``simulate --vision-dp``: split, encode, all-gather, select and backward, on every simulated rank."""

    batch: PackedBatch
    timeout: float = DEFAULT_TIMEOUT_S
    plan: VisionDPPlan | None = None
    ranks: list[RankView] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    natural_order: bool = True
    selection_fed: bool = True
    deepstack_layers: int = 0
    mixed: bool = False
    model: str = ""
    placeholder: list[bool] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.is_problem for f in self.findings)

    def run(self, result: Result) -> None:
        """Simulate the vision-DP step for ``result`` (a :class:`~cpinspect.simulation.run.Result`)."""
        tokens, cp = result.tokens, result.cp
        self.model = tokens.model
        items = _items(self.batch, result, split=tokens.model == "qwen3-vl")
        self.plan = plan_vision_dp(items, cp, tokens.merge_area, _assignment(self.batch, items.count, cp))
        self.deepstack_layers = DEEPSTACK_LAYERS if tokens.model == "qwen3-vl" else 0
        requires_grad = _requires_grad(self.batch, cp)
        self.placeholder = [bool(p) and int(n) == 0 for p, n in zip(_placeholder(self.batch, cp),
                                                                      self.plan.items_per_rank.tolist())]
        # the 1x1 placeholder's encoder output requires grad, so the empty rank enters the backward all-reduce
        requires_grad = [g or p for g, p in zip(requires_grad, self.placeholder)]
        selected = [r.selected_rows for r in result.ranks]
        local_rows = [self.plan.rank_rows(r) for r in range(cp)]
        states, failure = execute_spmd(cp, vision_dp_rank_program, local_rows, self.plan.rows_per_rank, selected,
                                       self.deepstack_layers, requires_grad, timeout=self.timeout)
        if failure is not None:
            states = settled_states(states, requires_grad)
        self.ranks = [self._rank_view(state, result) for state in states]
        for view in self.ranks:
            if self.placeholder[view.rank]:
                view.items, view.patches = [f"1x1 placeholder image ({PLACEHOLDER_PATCHES} patches -> 1 row, dropped "
                                            "before the all-gather)"], PLACEHOLDER_PATCHES
        self.findings = self._check(states, failure, requires_grad, result)

    def _rank_view(self, state: RankState, result: Result) -> RankView:
        plan, rank = self.plan, state.rank
        assert plan is not None
        mine = plan.rank_items(rank)
        value: RankDP | None = state.value if state.status == "returned" else None
        grad_ok = None if value is None or value.grad is None else bool((value.grad == 1).all())
        return RankView(rank, [plan.items.label(i) for i in mine.tolist()], int(plan.patches_per_rank[rank]),
                        int(plan.rows_per_rank[rank]), plan.rank_rows(rank),
                        _collective_summary(state),
                        state.describe(), grad_ok)

    def _check(self, states: list[RankState], failure: SpmdError | None, requires_grad: list[bool],
               result: Result) -> list[Finding]:
        findings = _deepstack_findings(self.batch, result)
        findings += self._reorganize(result)
        if failure is not None:
            return [_collective_finding(failure, self.plan, requires_grad, states), *findings]
        values: list[RankDP] = [s.value for s in states]
        if values:
            natural = torch.arange(int(self.plan.item_rows.sum())) if self.plan is not None else None
            self.natural_order = natural is None or torch.equal(values[0].gathered, natural)
            self.selection_fed = all(torch.equal(v.selected, r.expected_rows) and all(
                torch.equal(d, v.selected) for d in v.deepstack_selected) for v, r in zip(values, result.ranks))
            if not self.natural_order:
                findings.insert(0, _order_finding(self.plan, values, result))
        return _empty_rank_findings(self.plan, self.ranks, self.placeholder) + findings

    def _reorganize(self, result: Result) -> list[Finding]:
        """Per rank, what the reorganize_inputs run-count assertion sees (Qwen3-VL, images and videos)."""
        plan = self.plan
        assert plan is not None
        kinds = plan.items.kind
        self.mixed = self.model == "qwen3-vl" and bool((kinds == VIDEO).any()) and bool((kinds != VIDEO).any())
        if not self.mixed:
            return []
        tokens = result.tokens
        for view, rank in zip(self.ranks, result.ranks):
            row = result.full_ids if result.input_form == "full" else rank.input_ids
            view.run_count = run_count(row, plan.items, tokens.image_token_id, tokens.video_token_id)
        failing = [v for v in self.ranks if v.run_count is not None and not v.run_count.passes]
        if not failing:
            return []
        seen = "; ".join(f"rank {v.rank}: {v.run_count.runs} runs ({v.run_count.image_runs} image, "
                         f"{v.run_count.video_runs} video)" for v in failing if v.run_count is not None)
        return [Finding(
            "REORGANIZE_RUNS_MISMATCH", "info",
            f"with images and videos in one pre-sharded row, Megatron-Bridge's reorganize_inputs would count "
            f"placeholder runs in the local row and assert they equal sum(t) = {plan.items.count}: {seen}",
            "the assertion expects the full row; gather the ids first or take the image-only/video-only branch",
            rank=failing[0].rank)]

    def add_json(self, document: dict[str, Any]) -> None:
        """``vision_dp`` summary, ``ranks[r].vision_dp``, and the findings."""
        plan = self.plan
        if plan is None:
            return
        by_rank = {v.rank: v for v in self.ranks}
        for entry in document["ranks"]:
            view = by_rank[entry["rank"]]
            entry["vision_dp"] = {
                "items": view.items, "patches": view.patches, "rows": view.rows,
                "natural_rows": view.natural_rows.tolist(), "collectives": view.collectives,
                "grad_ok": view.grad_ok,
                "run_count": None if view.run_count is None else {
                    "image_runs": view.run_count.image_runs, "video_runs": view.run_count.video_runs,
                    "expected": view.run_count.expected, "passes": view.run_count.passes},
            }
        document["vision_dp"] = {
            "assigned_by": plan.assigned_by,
            "items": [plan.items.label(i) for i in range(plan.items.count)],
            "item_rank": plan.item_rank.tolist(),
            "items_per_rank": plan.items_per_rank.tolist(),
            "patches_per_rank": plan.patches_per_rank.tolist(),
            "rows_per_rank": plan.rows_per_rank.tolist(),
            "deepstack_layers": self.deepstack_layers,
            "natural_order": self.natural_order,
            "selection_fed": self.selection_fed,
        }
        document.setdefault("findings", []).extend(f.to_dict() for f in self.findings)


def _empty_rank_findings(plan: VisionDPPlan | None, views: list[RankView], placeholder: list[bool]) -> list[Finding]:
    """VISION_DP_EMPTY_RANK: a rank with no item still has to enter every vision-DP collective."""
    if plan is None:
        return []
    filled = [r for r, p in enumerate(placeholder) if p]
    empty = [r for r in torch.nonzero(plan.items_per_rank == 0).view(-1).tolist() if r not in filled]
    out = [] if not filled else [Finding(
        "VISION_DP_PLACEHOLDER", "info",
        f"rank(s) {', '.join(map(str, filled))} hold no vision item and encode a 1x1 placeholder image instead "
        f"({PLACEHOLDER_PATCHES} patches -> 1 row; Nemotron Omni vision_dp_over_cp, Megatron-LM#7315): the encoder "
        "runs on every rank, the placeholder's row is dropped before the all-gather (0 rows sent), and its output "
        "requires grad, so these ranks enter the backward all-reduce like the others (simulated: "
        + "; ".join(f"rank {v.rank}: {', '.join(v.collectives) or 'none'}" for v in views if v.rank in filled[:4])
        + ")", "")]
    if not empty:
        return out
    names = ", ".join(map(str, empty))
    entered = "; ".join(f"rank {v.rank}: {', '.join(v.collectives) or 'none'}" for v in views if v.rank in empty[:4])
    return [Finding(
        "VISION_DP_EMPTY_RANK", "warning",
        f"rank(s) {names} encode no vision item ({int(plan.items.count)} item(s) over cp={len(views)} ranks): each "
        f"still has to enter the forward all-gather with 0 rows and the backward all-reduce of the gathered rows "
        f"(simulated here: {entered}); in a real job its zero-row placeholder must require grad, or it skips the "
        "all-reduce and the other ranks hang (Megatron-Bridge#4784)",
        "make sure empty ranks take part: ensure_requires_grad_for_cp_collective (Megatron-Bridge#4784), or a 1x1 "
        "placeholder image on empty ranks whose rows are dropped after the encoder (Nemotron Omni "
        "vision_dp_over_cp, Megatron-LM#7315)", rank=empty[0]), *out]


def _collective_summary(state: RankState) -> list[str]:
    """``all_gather x4 [80, 1]``: the collectives one rank entered, grouped by op and shape."""
    groups: dict[tuple[str, str], list[int]] = {}
    for call in state.calls:
        groups.setdefault((call.op, str(list(call.shapes[0])) if call.shapes else ""), []).append(call.seq)
    return [f"{op} x{len(seqs)} {shape}".rstrip() for (op, shape), seqs in groups.items()]


def _items(batch: PackedBatch, result: Result, *, split: bool) -> VisionItems:
    logical = batch.logical_cu_seqlens if batch.logical_cu_seqlens is not None else (
        batch.cu_seqlens if result.padded_tokens else None)
    return find_vision_items(result.full_ids, result.layout.cu_seqlens, result.tokens,
                             image_grid_thw=batch.image_grid_thw, video_grid_thw=batch.video_grid_thw,
                             split_video_frames=split,
                             logical_lengths=None if logical is None else (logical[1:] - logical[:-1]).to(torch.long))


def _extra(batch: PackedBatch, key: str) -> list[torch.Tensor] | None:
    """The values of an extra key, one per row (rank file), or None when no row has it."""
    values = [extra.get(key) for extra in batch.extra]
    if not any(v is not None for v in values):
        return None
    if any(v is None for v in values):
        missing = [r for r, v in enumerate(values) if v is None]
        raise InputError(f"{key} is in some rank files but not in rank(s) {missing}", where=batch.source,
                         fix=f"save {key} in every rank's file, or in none")
    return [v for v in values if v is not None]


def _assignment(batch: PackedBatch, num_items: int, cp: int) -> torch.Tensor | None:
    values = _extra(batch, VISION_DP_RANKS_KEY)
    if values is None:
        return None
    ranks = values[0].reshape(-1)
    if ranks.is_floating_point() or ranks.numel() != num_items or (
            ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) >= cp)):
        raise InputError(
            f"{VISION_DP_RANKS_KEY} is {ranks.tolist()}, but it must hold one CP rank in 0..{cp - 1} for each of the "
            f"{num_items} vision item(s) in natural order",
            where=f"{batch.source}, key {VISION_DP_RANKS_KEY}",
            fix="store the rank that encoded each image (each video frame for Qwen3-VL), or drop the key to "
            "simulate Megatron-Bridge's count split")
    return ranks.to(torch.long)


def _per_rank_values(batch: PackedBatch, key: str, cp: int) -> torch.Tensor | None:
    """``[cp, ...]`` from ``[cp, ...]`` in a full batch or one value per rank file."""
    values = _extra(batch, key)
    if values is None:
        return None
    stacked = values[0] if len(values) == 1 else torch.stack([v.reshape(-1) for v in values])
    if stacked.dim() == 0 or stacked.shape[0] != cp:
        raise InputError(
            f"{key} has shape {list(stacked.shape)}, but it needs one entry per CP rank ({cp})",
            where=f"{batch.source}, key {key}",
            fix="store [cp, ...] in a full batch, or one value in each rank file")
    return stacked


def _placeholder(batch: PackedBatch, cp: int) -> list[bool]:
    values = _per_rank_values(batch, PLACEHOLDER_KEY, cp)
    return [False] * cp if values is None else [bool(v) for v in values.reshape(cp, -1).all(dim=1).tolist()]


def _requires_grad(batch: PackedBatch, cp: int) -> list[bool]:
    values = _per_rank_values(batch, REQUIRES_GRAD_KEY, cp)
    return [True] * cp if values is None else [bool(v) for v in values.reshape(cp, -1).all(dim=1).tolist()]


def settled_states(states: list[RankState], requires_grad: list[bool]) -> list[RankState]:
    """The states once every rank has got as far as it can: independent of which rank arrived first.

    The simulated group aborts the run as soon as one rank returns while another waits, so which
    ranks had reached the backward all-reduce by then is a race. The program is the same on every
    rank up to that point: a rank whose placeholder requires grad enters the all-reduce (and waits
    there), one whose placeholder does not returns after the forward gathers.
    """
    longest = max(states, key=lambda s: len(s.calls), default=None)
    if longest is None or not longest.calls or longest.calls[-1].op != "all_reduce":
        return states
    reduce_call = longest.calls[-1]
    before = [c for c in longest.calls if c.seq < reduce_call.seq]
    settled = []
    for state in states:
        aborted = state.status == "raised" and type(state.error).__name__ == "CollectiveAbort"
        if state.status == "returned" or (state.status == "raised" and not aborted):
            settled.append(state)  # finished, or a real error of this rank: shown as it is
        elif requires_grad[state.rank]:
            settled.append(dataclasses.replace(state, status="waiting", calls=[*before, reduce_call], error=None))
        else:
            settled.append(dataclasses.replace(state, status="returned", calls=list(before), error=None))
    return settled


def _settled_text(states: list[RankState]) -> str:
    waiting = [s for s in states if s.status == "waiting"]
    returned = [s for s in states if s.status == "returned"]
    parts = []
    if waiting:
        parts.append(f"rank(s) {', '.join(str(s.rank) for s in waiting)} wait in {waiting[0].calls[-1].describe()}")
    if returned:
        parts.append(f"rank(s) {', '.join(str(s.rank) for s in returned)} returned after "
                     f"{len(returned[0].calls)} collective(s)")
    return "; ".join(parts)


def _collective_finding(failure: SpmdError, plan: VisionDPPlan | None, requires_grad: list[bool],
                        states: list[RankState]) -> Finding:
    skipped = [r for r, g in enumerate(requires_grad) if not g]
    empty = [] if plan is None else torch.nonzero(plan.items_per_rank == 0).view(-1).tolist()
    if skipped and set(skipped) <= set(empty):
        return Finding(
            "VISION_DP_EMPTY_RANK_SKIPS_COLLECTIVE", "error",
            f"rank(s) {', '.join(map(str, skipped))} encode no vision item, and their zero-row placeholder does not "
            f"require grad, so they skip the backward all-reduce the other ranks wait in; a real job hangs until "
            f"the NCCL timeout. Simulated: {_settled_text(states) or failure}",
            "make the empty rank's placeholder take part: ensure_requires_grad_for_cp_collective (Megatron-Bridge "
            "#4784) so every CP rank runs the same collectives", rank=skipped[0])
    return Finding("COLLECTIVE_DIVERGENCE", "error", f"vision DP: {failure}",
                   "every CP rank must run the same vision-DP collectives, in the same order")


def _order_finding(plan: VisionDPPlan | None, values: list[RankDP], result: Result) -> Finding:
    assert plan is not None
    gathered = values[0].gathered
    position = int(torch.nonzero(gathered != torch.arange(gathered.numel())).view(-1)[0])
    item_of_row = torch.repeat_interleave(torch.arange(plan.items.count), plan.item_rows)
    owners = "; ".join(f"rank {r}: " + ", ".join(plan.items.label(i) for i in plan.rank_items(r).tolist())
                       for r in range(plan.cp))
    wrong = [r.rank for v, r in zip(values, result.ranks) if not torch.equal(v.selected, r.expected_rows)]
    return Finding(
        "VISION_DP_ORDER", "error",
        f"the gathered vision embeddings are not in natural order: gathered row {position} is natural row "
        f"{int(gathered[position])} ({plan.items.label(int(item_of_row[gathered[position]]))}), because the items "
        f"were assigned to ranks non-contiguously ({owners}); rank(s) {', '.join(map(str, wrong)) or 'none'} would "
        "scatter other tokens' embeddings",
        "give each rank a contiguous run of items in natural order (the count split: the first n % cp ranks take "
        "one more), or permute the gathered rows back to natural order before the selection",
        rank=wrong[0] if wrong else None)


def _deepstack_findings(batch: PackedBatch, result: Result) -> list[Finding]:
    counts = _per_rank_values(batch, DEEPSTACK_ROWS_KEY, result.cp)
    if counts is None:
        return []
    counts = counts.reshape(result.cp, -1).to(torch.long)
    total = int(result.vision_embed_count)
    problems = []
    for rank, row in zip(result.ranks, counts.tolist()):
        holds = int(rank.local_mask.sum())
        if any(n != holds for n in row):
            how = "the full deepstack tensors" if all(n == total for n in row) else "deepstack rows"
            problems.append((rank.rank, f"rank {rank.rank} passes {how} with {row} rows but holds {holds} vision "
                                        f"token(s) and selected {rank.selected_rows.numel()} embedding rows"))
    if not problems:
        return []
    return [Finding(
        "DEEPSTACK_NOT_SELECTED", "error",
        "; ".join(text for _, text in problems) + ": the deepstack features were not selected with the rank's rows",
        "index_select every deepstack feature with the same rows as vision_embeds (deepstack_feature_lists[k]"
        ".index_select(0, rows)) and use the rank-local visual_pos_masks", rank=problems[0][0])]
