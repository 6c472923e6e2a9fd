"""Which form a loaded batch has for a given cp: a full row, or rows pre-sharded for it; refuse the rest.

The one place that turns "cu_seqlens ends at X, the rows hold Y tokens" into a plain message naming the cp
the data was cut for.
"""

from __future__ import annotations

from cpinspect.core.batch import PackedBatch, row_cut_for
from cpinspect.core.errors import InputError


def input_form(batch: PackedBatch, cp: int) -> str:
    """``full`` or ``presharded`` for ``cp``; anything else is an :class:`InputError` with the fix."""
    form = batch.form_for(cp)
    total = int(batch.cu_seqlens[-1])
    files = len(batch.rows)
    if form == "neither" and batch.per_rank_files and batch.form_for(files) == "presharded":
        raise InputError(
            f"the batch has {files} rank files, pre-sharded for cp={files} (cu_seqlens ends at {total} = {files} x "
            f"{batch.row_tokens} local tokens), but --cp {cp} was given (CP_SIZE_MISMATCH)",
            where=batch.source,
            fix=f"pass --cp {files}; the local rows were cut for {files} ranks",
        )
    if form == "neither":
        per_rank = f"{len(batch.rows)} per-rank rows of" if batch.per_rank_files else "a row of"
        raise InputError(
            f"cu_seqlens ends at {total}, but the batch has {per_rank} {batch.row_tokens} tokens: that is neither a "
            f"full row (cu_seqlens[-1] == {batch.row_tokens}) nor a row pre-sharded for cp={cp} "
            f"(cu_seqlens[-1] == {cp} * {batch.row_tokens} = {cp * batch.row_tokens})",
            where=f"{batch.source}, cu_seqlens[-1]",
            fix=cp_hint(total, batch.row_tokens)
            + "; or the cu_seqlens are logical (unpadded) boundaries where the physical ones are needed",
        )
    if form == "presharded" and len(batch.rows) != cp:
        if len(batch.rows) == 1:
            raise InputError(
                f"this is one rank's pre-sharded row ({batch.row_tokens} of {total} tokens); simulating needs all "
                f"{cp} ranks' files",
                where=batch.source,
                fix="pass the directory holding rank0.pt ... rank{cp-1}.pt (or list every rank file); "
                "'cpinspect info' works on a single rank's file",
            )
        raise InputError(
            f"{len(batch.rows)} rank files were given but cp is {cp}",
            where=batch.source,
            fix=f"pass --cp {len(batch.rows)}, or add the missing rank files",
        )
    return form


def cp_hint(total: int, row: int) -> str:
    if (cut := row_cut_for(total, row)) is not None:
        return f"if this is one rank's local row, the data was sharded for cp={cut}: pass --cp {cut}"
    return "check that input_ids and cu_seqlens come from the same batch"
