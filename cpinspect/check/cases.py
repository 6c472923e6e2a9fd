"""Packed rows to run a user's selection on: seeded generated cases, users' batch files, vectors.

A :class:`Case` is one full packed row (token ids, vision mask, physical and logical boundaries,
the number of vision embeddings) and the cp to shard it over. Generated cases are the shapes that
break hand-written selections (the kind cycles with the case number, the cp with it too):

* ``crossing``: vision runs straddling chunk boundaries, the middle one (both chunks on one rank)
  and rank boundaries, plus runs spanning several chunks;
* ``empty-rank``: some ranks hold no vision token at all (the early-return deadlock);
* ``text-only``: segments without vision, and sometimes a row without any;
* ``video``: Qwen-VL video frames and images with real grids, padded segments (logical != physical);
* ``single-segment`` and ``many-short`` (many segments of one or two chunks per rank);
* ``random``: :func:`cpinspect.core.synth.random_batch` runs anywhere.

Every case carries its layout (:data:`cpinspect.core.layout.LAYOUTS`, ``zigzag`` by default): its
ranks' local positions come from that layout's index map and its rows from the oracle of that layout.
Cases are padded as the layout's rule pads (:func:`cpinspect.core.layout.padded_boundaries`): under the
zigzag rule segments are multiples of ``2*cp`` (at cp 1, where nothing is split, they may be odd);
under the contiguous and sequence-zigzag rules segments have any length and only the row's end is padded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from cpinspect.core.hybrid import KIND as HYBRID
from cpinspect.core.hybrid import with_pad_sequences
from cpinspect.core.layout import Layout, make_layout, pad_multiple, pad_row, padded_boundaries, rule_of
from cpinspect.core.synth import TEXT_HIGH, TEXT_LOW, build_batch, random_batch
from cpinspect.core.tokens import TokenConfig, token_config
from cpinspect.core.vision_items import placeholder_mask

KINDS = ("crossing", "empty-rank", "text-only", "video", "single-segment", "many-short", "random")
TEXT_TOKEN_ID = TEXT_LOW  # what a vision position becomes when a shrink step turns it into text


@dataclass(frozen=True)
class Case:
    """One full packed row and the cp to shard it over (tensors on the CPU, never shared).

    ``input_ids``/``vision_mask`` are ``[T]``; ``cu_seqlens`` are physical boundaries ``[S + 1]``
    (int64) and ``logical_cu_seqlens`` the real lengths inside them (``None`` = no padding).
    ``explicit_mask`` says the mask came from the batch rather than from the placeholder ids;
    ``layout`` names how the row is cut over the ranks (:func:`cpinspect.core.layout.make_layout`).
    """

    name: str
    kind: str
    cp: int
    input_ids: torch.Tensor
    vision_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    logical_cu_seqlens: torch.Tensor | None
    vision_embed_count: int
    tokens: TokenConfig
    explicit_mask: bool = False
    layout: str = "zigzag"
    segment_cp: torch.Tensor | None = None  # hybrid layout only: ``[S]`` each segment's local cp

    def plan(self) -> Layout:
        """The case's :class:`~cpinspect.core.layout.Layout` (hybrid: built from ``segment_cp``)."""
        return make_layout(self.cu_seqlens, self.cp, self.layout, self.segment_cp)

    @property
    def total_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def vision_tokens(self) -> int:
        return int(self.vision_mask.sum())

    @property
    def segment_lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    @property
    def logical_or_physical(self) -> torch.Tensor:
        return self.logical_cu_seqlens if self.logical_cu_seqlens is not None else self.cu_seqlens

    def size_key(self) -> tuple[int, int, int, int]:
        """What "smaller" means when shrinking: cp, then segments, tokens, vision tokens."""
        return (self.cp, self.num_segments, self.total_tokens, self.vision_tokens)

    @property
    def logical_lengths(self) -> list[int]:
        """The real tokens of each segment (its physical length where the case has no padding)."""
        return (self.logical_or_physical[1:] - self.logical_or_physical[:-1]).tolist()

    def describe(self) -> str:
        """``cp 2, 2 segment(s) [3 in 4, 8], ...``: a padded segment shows its logical length in its physical one."""
        lengths, logical = self.segment_lengths, self.logical_lengths
        parts = [str(p) if q == p else f"{q} in {p}" for q, p in zip(logical, lengths)]
        shown = ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")
        layout = "" if self.layout == "zigzag" else f", {self.layout} layout"
        if self.segment_cp is not None:
            sizes = self.segment_cp.tolist()
            layout += f" (local cp {', '.join(map(str, sizes[:6]))}{', ...' if len(sizes) > 6 else ''})"
        return (
            f"cp {self.cp}{layout}, {self.num_segments} segment(s) [{shown}], {self.total_tokens} tokens, "
            f"{self.vision_tokens} vision"
        )

    def global_indices(self) -> torch.Tensor:
        """``[cp, T / cp]`` global position of every local position, in the case's layout."""
        return self.plan().all_global_indices()

    def local_masks(self) -> torch.Tensor:
        """``[cp, T / cp]`` every rank's local vision mask."""
        return self.vision_mask[self.global_indices()]

    def owner_of_positions(self) -> torch.Tensor:
        """``[T]`` the rank holding each global position."""
        indices = self.global_indices()
        owner = torch.empty(self.total_tokens, dtype=torch.long)
        owner[indices] = torch.arange(self.cp)[:, None].expand_as(indices)
        return owner

    def segment_of_positions(self) -> torch.Tensor:
        """``[T]`` the segment each global position belongs to."""
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        return torch.repeat_interleave(torch.arange(self.num_segments), lengths, output_size=self.total_tokens)

    def real_positions(self) -> torch.Tensor:
        """``[T]`` True at positions inside the logical boundaries (False at padding)."""
        segment = self.segment_of_positions()
        offset = torch.arange(self.total_tokens) - self.cu_seqlens[segment]
        return offset < torch.tensor(self.logical_lengths, dtype=torch.long)[segment]

    def with_mask(self, mask: torch.Tensor, name: str | None = None) -> Case:
        """The same row with vision tokens at ``mask``; ids and embedding count follow.

        The count keeps any difference it had from the mask (a batch whose count is wrong stays
        wrong by the same amount), so a shrink step never repairs the failure it shrinks.
        """
        ids = self.input_ids.clone()
        ids[mask & ~self.vision_mask] = self.tokens.image_token_id
        ids[~mask & self.vision_mask] = TEXT_TOKEN_ID
        count = self.vision_embed_count + int(mask.sum()) - self.vision_tokens
        return replace(self, name=name or self.name, input_ids=ids, vision_mask=mask.clone(), vision_embed_count=count)

    def fitted(self) -> Case:
        """The row padded as its layout's rule pads (:func:`~cpinspect.core.layout.padded_boundaries`; pad
        positions are text, outside the logical boundaries); the case itself where it already fits."""
        physical = padded_boundaries(self.cu_seqlens, self.cp, self.layout, segment_cp=self.segment_cp)
        if torch.equal(physical, self.cu_seqlens):
            return self
        logical = self.logical_or_physical  # pad sequences hybrid appends are segments of logical length 0
        logical = torch.cat([logical, logical[-1:].expand(physical.numel() - logical.numel())])
        return replace(
            self, input_ids=pad_row(self.input_ids, self.cu_seqlens, physical, self.tokens.pad_token_id),
            vision_mask=pad_row(self.vision_mask, self.cu_seqlens, physical, False), cu_seqlens=physical,
            logical_cu_seqlens=logical, segment_cp=with_pad_sequences(self.segment_cp, physical),
        )

    def keep(self, keep: torch.Tensor, cp: int | None = None, name: str | None = None) -> Case:
        """Only the positions where ``keep`` is True; empty segments disappear (vectorised); the row is then
        padded again where its layout's rule needs it (:meth:`fitted`).

        Logical lengths shrink by the kept positions that lay inside them.
        """
        segment = self.segment_of_positions()
        offset = torch.arange(self.total_tokens) - self.cu_seqlens[segment]
        logical_len = (self.logical_or_physical[1:] - self.logical_or_physical[:-1])[segment]
        new_len = torch.zeros(self.num_segments, dtype=torch.long).index_add_(0, segment, keep.long())
        new_logical = torch.zeros(self.num_segments, dtype=torch.long).index_add_(
            0, segment, (keep & (offset < logical_len)).long())
        present = new_len > 0
        cu = _cumsum(new_len[present])
        logical = _cumsum(new_logical[present]) if self.logical_cu_seqlens is not None else None
        dropped_vision = int((self.vision_mask & ~keep).sum())
        segment_cp = None if self.segment_cp is None else self.segment_cp[present]
        if segment_cp is not None and cp is not None:  # clamped: the largest divisor of the new cp that divides c
            segment_cp = torch.gcd(segment_cp, torch.tensor(cp))
        return replace(
            self, name=name or self.name, cp=cp or self.cp, segment_cp=segment_cp, input_ids=self.input_ids[keep],
            vision_mask=self.vision_mask[keep], cu_seqlens=cu,
            logical_cu_seqlens=logical if logical is None or not torch.equal(logical, cu) else None,
            vision_embed_count=self.vision_embed_count - dropped_vision,
        ).fitted()


def _cumsum(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths.to(torch.long), 0)])


def generate_cases(cps: Sequence[int], count: int, seed: int, tokens: TokenConfig | None = None,
                   layout: str = "zigzag") -> list[Case]:
    """``count`` seeded cases cut by ``layout``; case ``i`` uses ``cps[i % len(cps)]`` and cycles through
    :data:`KINDS`. Zigzag-rule layouts get the zigzag cases draw for draw."""
    tokens = tokens or token_config()
    cases = []
    for index in range(count):
        cp = cps[index % len(cps)]
        kind = KINDS[(index // len(cps)) % len(KINDS)]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        name = f"case {index} ({kind}, seed {seed})"
        if layout == HYBRID:
            cases.append(with_local_cp(BUILDERS[kind](generator, cp, tokens, name, "zigzag"), generator))
        else:
            cases.append(BUILDERS[kind](generator, cp, tokens, name, layout))
    return cases


def with_local_cp(case: Case, generator: torch.Generator) -> Case:
    """The zigzag ``case`` as a hybrid case: each segment's local cp drawn from the divisors of its cp (after
    every draw the zigzag case made, so those stay what they were), then padded as hybrid CP pads: segments
    to ``2c`` (zigzag cases already are) and pad sequences (local cp 1) until every rank holds one share."""
    divisors = torch.tensor([d for d in range(1, case.cp + 1) if case.cp % d == 0])
    drawn = divisors[torch.randint(divisors.numel(), (case.num_segments,), generator=generator)]
    hybrid = replace(case, layout=HYBRID, segment_cp=drawn).fitted()
    if case.kind == "empty-rank" and case.cp > 1:  # empty the ranks of the hybrid cut, not of the zigzag one
        return _emptied(hybrid, generator)
    return hybrid


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """A uniform integer in ``[low, high]`` (inclusive, like ``random.randint``)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _runs_mask(total: int, starts: Sequence[int], ends: Sequence[int]) -> torch.Tensor:
    """``[total]`` True inside any ``[start, end)`` run (clipped to the row), by a difference array."""
    delta = torch.zeros(total + 1, dtype=torch.long)
    start = torch.tensor(list(starts), dtype=torch.long).clamp(0, total)
    end = torch.tensor(list(ends), dtype=torch.long).clamp(0, total)
    delta.index_add_(0, start, torch.ones_like(start)).index_add_(0, end, -torch.ones_like(end))
    return torch.cumsum(delta, 0)[:total] > 0


def _random_runs(generator: torch.Generator, lengths: Sequence[int], max_runs: int = 3) -> torch.Tensor:
    """Up to ``max_runs`` random vision runs inside each segment."""
    starts, ends, offset = [], [], 0
    for length in lengths:
        for _ in range(_randint(generator, 0, max_runs) if length else 0):
            start = offset + _randint(generator, 0, length - 1)
            starts.append(start)
            ends.append(min(offset + length, start + _randint(generator, 1, max(1, length // 2))))
        offset += length
    return _runs_mask(offset, starts, ends)


def _segment_length(generator: torch.Generator, cp: int, chunks: int, layout: str) -> int:
    """``2*cp*chunks`` tokens under the zigzag rule; where segments have no length rule (cp 1, or a layout
    that pads only the row's end) up to ``2*cp - 1`` fewer, so any length is generated. No extra random
    draw for the zigzag rule at cp > 1: those cases stay what they were."""
    if cp > 1 and rule_of(layout) == "zigzag":
        return 2 * cp * chunks
    return 2 * cp * chunks - _randint(generator, 0, 2 * cp - 1)


def _from_mask(name: str, kind: str, cp: int, lengths: Sequence[int], mask: torch.Tensor, tokens: TokenConfig,
               generator: torch.Generator, layout: str) -> Case:
    """A case whose text positions get random ids and vision positions the image placeholder, padded as
    ``layout`` pads."""
    total = sum(lengths)
    ids = torch.randint(TEXT_LOW, TEXT_HIGH, (total,), generator=generator)
    ids[placeholder_mask(ids, tokens)] = TEXT_TOKEN_ID  # custom ids may collide
    ids[mask] = tokens.image_token_id
    cu = _cumsum(torch.tensor(list(lengths), dtype=torch.long))
    return Case(name, kind, cp, ids, mask, cu, None, int(mask.sum()), tokens, layout=layout).fitted()


def _crossing(generator: torch.Generator, cp: int, tokens: TokenConfig, name: str, layout: str) -> Case:
    chunks = [_randint(generator, 2, 5) for _ in range(_randint(generator, 1, 3))]
    lengths = [2 * cp * c for c in chunks]
    starts, ends, segment_start = [], [], 0
    for chunk_len, length in zip(chunks, lengths):
        # chunk cp-1 | cp is the middle (one rank holds both sides); any other boundary is a rank boundary
        for boundary_chunk in (cp, _randint(generator, 1, 2 * cp - 1)):
            boundary = segment_start + boundary_chunk * chunk_len
            starts.append(boundary - _randint(generator, 1, chunk_len))
            ends.append(boundary + _randint(generator, 1, chunk_len))
        spanning = segment_start + _randint(generator, 0, chunk_len - 1)
        starts.append(spanning)
        ends.append(min(segment_start + length, spanning + 2 * chunk_len + 1))
        segment_start += length
    if layout != "zigzag":  # and the boundaries of the layout's own pieces (for contiguous: the rank boundaries)
        for boundary in make_layout(_cumsum(torch.tensor(lengths)), cp, layout).piece_start[1:].tolist():
            starts.append(boundary - _randint(generator, 1, 3))
            ends.append(boundary + _randint(generator, 1, 3))
    mask = _runs_mask(sum(lengths), starts, ends)
    return _from_mask(name, "crossing", cp, lengths, mask, tokens, generator, layout)


def _empty_rank(generator: torch.Generator, cp: int, tokens: TokenConfig, name: str, layout: str) -> Case:
    lengths = [_segment_length(generator, cp, _randint(generator, 1, 4), layout)
               for _ in range(_randint(generator, 1, 4))]
    case = _from_mask(name, "empty-rank", cp, lengths, _random_runs(generator, lengths), tokens, generator, layout)
    if cp == 1:
        return case.with_mask(torch.zeros_like(case.vision_mask))
    return _emptied(case, generator)


def _emptied(case: Case, generator: torch.Generator) -> Case:
    """``case`` with no vision token on 1 to cp-1 random ranks of its layout (at least one vision token left)."""
    empty = torch.randperm(case.cp, generator=generator)[: _randint(generator, 1, case.cp - 1)]
    allowed = ~torch.isin(case.owner_of_positions(), empty) & case.real_positions()
    mask = case.vision_mask & allowed
    if not mask.any() and allowed.any():  # keep one vision token so the non-empty ranks really gather something
        mask[int(torch.nonzero(allowed)[0])] = True
    return case.with_mask(mask)


def _text_only(generator: torch.Generator, cp: int, tokens: TokenConfig, name: str, layout: str) -> Case:
    lengths = [_segment_length(generator, cp, _randint(generator, 1, 4), layout)
               for _ in range(_randint(generator, 2, 5))]
    case = _from_mask(name, "text-only", cp, lengths, _random_runs(generator, lengths), tokens, generator, layout)
    if _randint(generator, 0, 2) == 0:
        return case.with_mask(torch.zeros_like(case.vision_mask))
    text_segments = torch.randperm(len(lengths), generator=generator)[: _randint(generator, 1, len(lengths) - 1)]
    return case.with_mask(case.vision_mask & ~torch.isin(case.segment_of_positions(), text_segments))


def _video(generator: torch.Generator, cp: int, tokens: TokenConfig, name: str, layout: str) -> Case:
    """Real Qwen-VL placeholder layouts with grids, padded as the layout pads: under the zigzag rule every
    segment up to a multiple of ``2*cp`` (sometimes one more), otherwise the row's end."""
    sides = (2, 4, 8)
    segments = []
    for index in range(_randint(generator, 1, 3)):
        items: list[tuple[str, object]] = [("text", _randint(generator, 0, 6))]
        if index == 0 or _randint(generator, 0, 1):
            t, h, w = _randint(generator, 1, 3), sides[_randint(generator, 0, 2)], sides[_randint(generator, 0, 2)]
            items += [("video", (t, h, w)), ("text", _randint(generator, 0, 4))]
        if _randint(generator, 0, 1):
            items += [("image", (1, sides[_randint(generator, 0, 2)], sides[_randint(generator, 0, 2)]))]
        segments.append(items)
    seed = _randint(generator, 0, 2**31 - 1)
    logical = build_batch(segments, tokens=tokens, seed=seed)["cu_seqlens"].to(torch.long)
    multiple = pad_multiple(cp, layout)  # zigzag rule: 2·cp; 1 at cp 1, where an odd length needs no padding
    if rule_of(layout) == "zigzag":
        padded = [(-(-int(n) // multiple) + _randint(generator, 0, 1)) * multiple for n in logical[1:] - logical[:-1]]
        physical = [max(p, multiple) for p in padded]
    else:
        physical = padded_boundaries(logical, cp, layout).diff().tolist()
    batch = build_batch(segments, physical, tokens=tokens, seed=seed)
    ids = batch["input_ids"].reshape(-1)
    mask = placeholder_mask(ids, tokens)
    cu = batch["cu_seqlens_padded"].to(torch.long)
    logical_cu = batch["cu_seqlens"].to(torch.long)
    return Case(name, "video", cp, ids, mask, cu, None if torch.equal(cu, logical_cu) else logical_cu,
                int(batch["vision_embed_count"]), tokens, layout=layout)


def _single_segment(generator: torch.Generator, cp: int, tokens: TokenConfig, name: str, layout: str) -> Case:
    lengths = [_segment_length(generator, cp, _randint(generator, 1, 8), layout)]
    mask = _random_runs(generator, lengths, 4)
    return _from_mask(name, "single-segment", cp, lengths, mask, tokens, generator, layout)


def _many_short(generator: torch.Generator, cp: int, tokens: TokenConfig, name: str, layout: str) -> Case:
    lengths = [_segment_length(generator, cp, _randint(generator, 1, 2), layout)
               for _ in range(_randint(generator, 8, 20))]
    mask = _random_runs(generator, lengths, 2)
    case = _from_mask(name, "many-short", cp, lengths, mask, tokens, generator, layout)
    all_vision = torch.randperm(len(lengths), generator=generator)[:2]  # whole segments of vision tokens
    whole = torch.isin(case.segment_of_positions(), all_vision) & case.real_positions()
    return case.with_mask(case.vision_mask | whole)


def _random(generator: torch.Generator, cp: int, tokens: TokenConfig, name: str, layout: str) -> Case:
    raw = random_batch(_randint(generator, 0, 2**31 - 1), cp, tokens=tokens)
    ids = raw["input_ids"].reshape(-1)
    mask = placeholder_mask(ids, tokens)
    return Case(name, "random", cp, ids, mask, raw["cu_seqlens"].to(torch.long), None, int(mask.sum()), tokens,
                layout=layout).fitted()


BUILDERS: dict[str, Callable[[torch.Generator, int, TokenConfig, str, str], Case]] = {
    "crossing": _crossing,
    "empty-rank": _empty_rank,
    "text-only": _text_only,
    "video": _video,
    "single-segment": _single_segment,
    "many-short": _many_short,
    "random": _random,
}
