"""The stacks' selection schemes side by side, each run as every rank's program through the simulated group.

* ``count`` (Megatron-Bridge): each rank counts the vision tokens of the pieces it holds, one
  all-gather of those counts gives every rank the row offsets (:func:`cpinspect.core.rank_selection.select_rank_rows`,
  the program ``simulate`` runs).
* ``token-ids`` (slime #2251): each rank all-gathers the local *token ids* (``gather_packed_input_ids``),
  puts them back in global order with every rank's local-to-global index map (``get_packed_cp_local_indices``,
  known from ``cu_seqlens``), finds the placeholders of the whole row and keeps the rows of its own.
* ``full-row`` (Hugging Face / verl): the embedding scatter runs on the full row before the sequence is
  sharded, so no rank talks to another; each keeps the rows that land on the positions it then holds.

Each is checked against the same oracle rows (:class:`cpinspect.simulation.run.RankResult.expected_rows`).
The collectives are those the simulated group recorded for every rank (op, shapes, dtypes), and the bytes
follow from them; host syncs are the device-to-host reads each program makes (counted where it makes them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cpinspect.core.errors import InputError
from cpinspect.core.tokens import TokenConfig
from cpinspect.core.vision_items import placeholder_mask
from cpinspect.groups.simulated import DEFAULT_TIMEOUT_S, CollectiveCall, execute_spmd
from cpinspect.simulation.run import Result, rank_program

SCHEMES = ("count", "token-ids", "full-row")
USED_BY = {
    "count": "Megatron-Bridge (all-gather of per-chunk vision counts)",
    "token-ids": "slime #2251 (gather_packed_input_ids + get_packed_cp_local_indices)",
    "full-row": "Hugging Face / verl (scatter on the full row before sharding)",
}
HOST_SYNCS = {"count": 1, "token-ids": 1, "full-row": 1}  # the one read of a vision count / boolean index each
DTYPE_BYTES = {"int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "float32": 4, "bfloat16": 2,
               "float16": 2, "float64": 8}


@dataclass
class SchemeRun:
    """One scheme on every rank: its rows, whether they equal the oracle's, what it moved."""

    scheme: str
    rows: list[torch.Tensor | None]
    ok: list[bool]
    calls: list[list[CollectiveCall]]
    host_syncs: int
    failure: str | None

    @property
    def all_ok(self) -> bool:
        return self.failure is None and all(self.ok)

    def bytes_sent(self, rank: int) -> int:
        return sum(_payload(call) for call in self.calls[rank])

    def bytes_received(self, rank: int, cp: int) -> int:
        """What the gathers bring in from the other ``cp - 1`` ranks (even gathers: each sends as much)."""
        return sum(_payload(call) * (cp - 1) for call in self.calls[rank] if "gather" in call.op)

    def to_dict(self, cp: int) -> dict[str, Any]:
        return {
            "scheme": self.scheme, "used_by": USED_BY[self.scheme], "ok": self.all_ok, "failure": self.failure,
            "host_syncs_per_rank": self.host_syncs,
            "ranks": [{"rank": r, "ok": self.ok[r], "collectives": [_call_text(c) for c in self.calls[r]],
                       "bytes_sent": self.bytes_sent(r), "bytes_received": self.bytes_received(r, cp)}
                      for r in range(cp)],
        }


def _payload(call: CollectiveCall) -> int:
    total = 0
    for shape, dtype in zip(call.shapes, call.dtypes):
        count = 1
        for size in shape:
            count *= size
        total += count * DTYPE_BYTES.get(dtype, 8)
    return total


def _call_text(call: CollectiveCall) -> str:
    shapes = ", ".join(f"{list(s)} {d}" for s, d in zip(call.shapes, call.dtypes))
    return f"{call.op}({shapes})"


def token_ids_program(group: Any, local_ids: list[torch.Tensor], all_indices: torch.Tensor,
                      tokens: TokenConfig) -> torch.Tensor:
    """slime's scheme on one rank: gather every rank's ids, undo the layout, rank this rank's placeholders."""
    rank = group.rank()
    mine = local_ids[rank].reshape(-1).contiguous()
    received = [torch.empty_like(mine) for _ in range(group.size())]
    dist.all_gather(received, mine, group=group)  # gather_packed_input_ids
    gathered = torch.cat(received)
    full = torch.empty_like(gathered)
    full[all_indices.reshape(-1)] = gathered  # every rank's local -> global map, from cu_seqlens alone
    mask = placeholder_mask(full, tokens)
    row_of = torch.cumsum(mask.to(torch.long), 0) - 1
    local = all_indices[rank]  # get_packed_cp_local_indices
    return row_of[local[mask[local]]]  # boolean index: the one host sync


def full_row_program(group: Any, full_ids: torch.Tensor, all_indices: torch.Tensor,
                     tokens: TokenConfig) -> torch.Tensor:
    """HF/verl on one rank: scatter the rows into the full row, then keep what lands on this rank's positions."""
    mask = placeholder_mask(full_ids, tokens)
    row_at = torch.full(full_ids.shape, -1, dtype=torch.long)
    row_at[mask] = torch.arange(int(mask.sum()))  # masked_scatter of all V rows; int(): the one host sync
    local = row_at[all_indices[group.rank()]]
    return local[local >= 0]


def run_scheme(result: Result, scheme: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> SchemeRun:
    """Run ``scheme`` on every rank of ``result``'s batch and layout through a fresh simulated group."""
    layout, cp = result.layout, result.cp
    all_indices = layout.all_global_indices()
    local_ids = [r.input_ids for r in result.ranks]
    if scheme == "count":
        local_masks = [result.full_mask[all_indices[r]] for r in range(cp)]
        piece_len = [layout.local_piece_len(r) for r in range(cp)]
        states, failure = execute_spmd(cp, rank_program, local_masks, piece_len, layout.rank_pieces, None,
                                       timeout=timeout)
    elif scheme == "token-ids":
        states, failure = execute_spmd(cp, token_ids_program, local_ids, all_indices, result.tokens, timeout=timeout)
    elif scheme == "full-row":
        states, failure = execute_spmd(cp, full_row_program, result.full_ids, all_indices, result.tokens,
                                       timeout=timeout)
    else:
        raise InputError(f"unknown scheme {scheme!r}", where="--scheme", fix=f"use one of {', '.join(SCHEMES)}")
    rows: list[torch.Tensor | None] = []
    for state in states:
        value = state.value if state.status == "returned" else None
        rows.append(value.rows if scheme == "count" and value is not None else value)
    ok = [row is not None and torch.equal(row, r.expected_rows) for row, r in zip(rows, result.ranks)]
    return SchemeRun(scheme, rows, ok, [list(s.calls) for s in states], HOST_SYNCS[scheme],
                     str(failure) if failure is not None else None)


def parse_schemes(names: list[str]) -> list[str]:
    """``--scheme`` values (repeatable, ``all`` for every scheme) in :data:`SCHEMES` order."""
    wanted: set[str] = set()
    for name in names:
        for part in name.split(","):
            part = part.strip()
            if part == "all":
                wanted.update(SCHEMES)
            elif part in SCHEMES:
                wanted.add(part)
            else:
                raise InputError(f"unknown scheme {part!r}", where="--scheme",
                                 fix=f"use one of {', '.join(SCHEMES)} or all")
    return [s for s in SCHEMES if s in wanted]
