"""Hypotheses of the row-selection family: which rows a rank scattered into the vision tokens it holds.

All rows into one rank's positions (rows not selected), under the data's own cut and every other
layout and cp; mask and rows cut with different layouts; the count all-gather run with logical
boundaries on rows cut with the physical ones. Each is a simulation on this batch's full vision
mask (:meth:`cpinspect.diagnose.scene.Scene.held`), never a formula.
"""

from __future__ import annotations

import torch

from cpinspect.core.layout import SEARCHED_LAYOUTS as LAYOUTS
from cpinspect.core.ranges import format_ranges
from cpinspect.diagnose.data_layout import LAYOUT_WORDS
from cpinspect.diagnose.prediction import NOT_SELECTED_HINT, OTHER_CPS, Prediction
from cpinspect.diagnose.scene import Scene


def all_rows(scene: Scene) -> dict[int, str]:
    """Row counts an encoder could have offered for the whole micro-batch, with their meaning."""
    out: dict[int, str] = {}
    rows, label = scene.embed_rows()
    grids, placeholders = scene.grid_rows(), scene.placeholders
    for value, text in ((placeholders, "the batch's vision placeholders"), (grids, "Σ t·h·w/4 of the grids"),
                        (rows, label)):
        if value is not None and value not in out:
            out[value] = f"{value} = {text}"
    return out


def not_selected_predictions(scene: Scene) -> list[Prediction]:
    """All rows scattered into one rank's positions, under the data's cut and every other one.

    A rank that holds every vision token (always so at cp 1) has nothing to select: there, a count
    mismatch is the grids' or the encoder's, not the selection's.
    """
    predictions = []
    everything = scene.placeholders
    for rows, meaning in all_rows(scene).items():
        if scene.cp > 1:
            predictions += [_not_selected(scene, rank, held, rows, meaning)
                            for rank, held in scene.actual_held().items() if held != everything]
        if scene.full_mask is None:
            continue
        for kind in LAYOUTS:
            for cp in OTHER_CPS[1:]:
                if (kind, cp) == (scene.data_layout, scene.cp):
                    continue
                predictions += [_not_selected_elsewhere(scene, kind, cp, rank, held, rows, meaning)
                                for rank, held in enumerate(scene.held(kind, cp) or []) if held != everything]
    return predictions


def _not_selected(scene: Scene, rank: int, held: int, rows: int, meaning: str) -> Prediction:
    who = f"rank {rank}" if rank >= 0 else "this rank"
    detail = _rank_detail(scene, rank)
    story = (f"{who} holds {held} vision tokens{detail}; all {rows} embedding rows ({meaning}) were scattered into "
             f"them: rows were not selected for this rank (each of the {scene.cp} ranks must scatter only its own "
             "rows)")
    return Prediction("PRESHARDED_ROWS_NOT_SELECTED", held, rows, story, NOT_SELECTED_HINT,
                      rank=rank if rank >= 0 else None)


def _rank_detail(scene: Scene, rank: int) -> str:
    if scene.result is None or rank < 0 or rank >= len(scene.result.ranks):
        return ""
    rows = scene.result.ranks[rank].selected_rows
    return f" (its own rows would be {format_ranges(rows, limit=4)})" if rows.numel() else ""


def _not_selected_elsewhere(scene: Scene, kind: str, cp: int, rank: int, held: int, rows: int,
                            meaning: str) -> Prediction:
    if cp != scene.cp:
        story = (f"the numbers fit cp={cp}, not cp={scene.cp}: rank {rank} of {cp} holds {held} vision tokens under "
                 f"{kind}, and all {rows} rows ({meaning}) were scattered into them; at cp={scene.cp} the ranks hold "
                 f"{held_text(scene.held(scene.data_layout, scene.cp))}")
        return Prediction("CP_SIZE_MISMATCH", held, rows, story,
                          f"use one cp everywhere: the data was cut for cp={cp} (context_parallel_size, cpinspect "
                          "--cp)",
                          rank=rank, cost=2, variant=f"{kind} cp={cp}")
    story = (f"the data was cut with {LAYOUT_WORDS[kind]}: rank {rank} then holds {held} vision tokens, and all "
             f"{rows} rows "
             f"({meaning}) were scattered into them; under {scene.data_layout} rank {rank} would hold "
             f"{held_text(scene.held(scene.data_layout, scene.cp), rank)}")
    return Prediction("LAYOUT_MISMATCH", held, rows, story,
                      f"shard the data the way the model does ({LAYOUT_WORDS[scene.layout]})", rank=rank, cost=2,
                      variant=f"{kind} cp={cp}")


def held_text(counts: list[int] | None, rank: int | None = None) -> str:
    if counts is None:
        return "(cannot be cut)"
    if rank is not None:
        return str(counts[rank])
    return ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts[:8])) + (", ..." if len(counts) > 8 else "")


def layout_mix_predictions(scene: Scene) -> list[Prediction]:
    """Mask cut one way, rows cut another (e.g. deepstack rows per sequence, hidden states per document)."""
    predictions = []
    for mask_kind in LAYOUTS:
        for rows_kind in LAYOUTS:
            mask_counts, row_counts = scene.held(mask_kind, scene.cp), scene.held(rows_kind, scene.cp)
            if mask_kind == rows_kind or mask_counts is None or row_counts is None:
                continue
            for rank, (held, rows) in enumerate(zip(mask_counts, row_counts)):
                if held == rows:
                    continue
                predictions.append(Prediction(
                    "LAYOUT_MISMATCH", held, rows,
                    f"rank {rank} holds {held} vision tokens under {LAYOUT_WORDS[mask_kind]}, but the {rows} rows "
                    f"offered to it are the rows of the tokens it would hold under {LAYOUT_WORDS[rows_kind]}: the mask "
                    f"and the embeddings were split with different layouts (per-sequence vs per-document mix-up)",
                    f"cut the vision mask, the embeddings and the deepstack rows with one layout ({scene.layout}); "
                    "split_deepstack_embs/split_data_cp_rank are per-sequence (BSHD), THD needs the per-document "
                    "indices", rank=rank, cost=1, variant=f"{mask_kind}/{rows_kind}"))
    return predictions


def logical_predictions(scene: Scene, *, gathered: bool) -> list[Prediction]:
    """Count-gather selection run with the logical boundaries on rows cut with the physical ones."""
    logical = scene.batch.logical_cu_seqlens
    if logical is None or torch.equal(logical, scene.cu) or scene.result is None or scene.data_layout != "zigzag":
        return []
    counted = _counts_in_logical_chunks(scene, logical)
    held = scene.held("zigzag", scene.cp) or []
    rows, _ = scene.embed_rows()
    seg = int(torch.nonzero((logical[1:] - logical[:-1]) != (scene.cu[1:] - scene.cu[:-1]))[0])
    why = (f"the selection counted vision tokens per chunk with the logical cu_seqlens (chunk = real length / "
           f"{2 * scene.cp} at offset logical start / {scene.cp}) on rows cut with the physical ones (segment {seg} "
           "is padded), so chunk boundaries shift")
    hint = "give the selection the physical boundaries (cu_seqlens_padded), the ones the rows were cut with"
    if gathered:
        if sum(counted) == sum(held):
            return []
        return [Prediction("LOGICAL_CU_AS_PHYSICAL", sum(counted), rows,
                           f"{why}: the ranks then count {' + '.join(map(str, counted))} = {sum(counted)} vision "
                           f"tokens instead of {sum(held)}", hint, scope="all ranks", segment=seg, cost=1)]
    return [Prediction("LOGICAL_CU_AS_PHYSICAL", h, c,
                       f"{why}: rank {r} holds {h} vision tokens but selects {c} rows", hint, rank=r, segment=seg,
                       cost=1)
            for r, (h, c) in enumerate(zip(held, counted))]


def _counts_in_logical_chunks(scene: Scene, logical: torch.Tensor) -> list[int]:
    """Per rank: vision tokens inside the local chunks that logical boundaries would define."""
    assert scene.result is not None
    cp = scene.cp
    masks = torch.stack([r.local_mask for r in scene.result.ranks]).to(torch.long)
    prefix = torch.cat([torch.zeros(cp, 1, dtype=torch.long), torch.cumsum(masks, 1)], dim=1)
    local_start = logical[:-1] // cp
    chunk = (logical[1:] - logical[:-1]) // (2 * cp)
    length = masks.shape[1]
    start = local_start.clamp(max=length)
    end = (local_start + 2 * chunk).clamp(max=length)
    return (prefix[:, end] - prefix[:, start]).sum(dim=1).tolist()
