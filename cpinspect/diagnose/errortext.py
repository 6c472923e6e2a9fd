"""Read the numbers out of the error a CP + vision run printed (no torch here).

Users arrive with a message, not a theory. Each recognised message form names two counts that
disagreed; :func:`parse_error_text` returns them as an :class:`ObservedError` with names that say
what each count *is* (``tokens``: placeholder positions to fill, ``rows``: embedding rows offered),
so the hypotheses in :mod:`cpinspect.diagnose.api` can compare them with what a simulation predicts.

Recognised forms (the sources that print them are named in the README):

* PyTorch ``shape mismatch: value tensor of shape [A, H] cannot be broadcast to indexing result
  of shape [B, H]`` (a masked scatter: A rows offered, B positions to fill);
* Hugging Face ``Image features and image tokens do not match: tokens: X, features Y`` and the
  video form (all spellings: ``tokens: X, features: Y``, ``tokens=X features=Y``);
* Megatron-Bridge ``Packed CP ranks contain N vision tokens, but the vision encoder produced M
  embeddings.`` (N summed over all CP ranks);
* AReaL ``Mismatch between local vision token count and local vision embedding rows:
  expected=X, got=Y``;
* PyTorch ``Sizes of tensors must match except in dimension D. Expected size A but got size B``;
* slime ``Packed sequence length N must be divisible by 2 * CP size C``;
* PyTorch ``The expanded size of the tensor (A) must match the existing size (B) at non-singleton
  dimension D`` (a chunk of B tokens where A were expected: VALID_ONLY_ROW);
* autograd ``apply() takes no keyword arguments``.

A log is read line by line (any size, constant memory); the *last* recognised line wins, since
the first failing rank usually prints last before the job dies. A torchrun prefix such as
``[rank1]:`` or ``[default1]:`` on that line gives the rank.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpinspect.core.errors import InputError

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RANK_PREFIX = re.compile(r"\[(?:rank|default)(\d+)\]")
_SHAPE = r"\[([\d,\s]*)\]"


@dataclass(frozen=True)
class ObservedError:
    """What one recognised error line says.

    ``kind`` is the message form (see :data:`KINDS`); ``numbers`` holds its counts under stable
    names; ``scope`` says whether the counts are one rank's (``"rank"``) or summed over all CP
    ranks (``"all ranks"``); ``rank`` comes from a torchrun log prefix when there is one.
    """

    kind: str
    numbers: dict[str, Any]
    line: str
    scope: str = "rank"
    rank: int | None = None
    line_number: int | None = None
    modality: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> int | None:
        value = self.numbers.get(name)
        return int(value) if isinstance(value, int) else None

    def to_dict(self) -> dict[str, Any]:
        """The ``observed`` object of ``diagnose --json``."""
        out: dict[str, Any] = {"kind": self.kind, "scope": self.scope, **self.numbers}
        if self.modality:
            out["modality"] = self.modality
        if self.rank is not None:
            out["rank"] = self.rank
        if self.line_number is not None:
            out["line_number"] = self.line_number
        out["line"] = self.line
        return out


def _ints(text: str) -> list[int]:
    return [int(part) for part in re.findall(r"\d+", text)]


def _scatter(match: re.Match[str]) -> ObservedError:
    value, index = _ints(match.group(1)), _ints(match.group(2))
    numbers: dict[str, Any] = {"value_shape": value, "index_shape": index}
    differing = [d for d in range(min(len(value), len(index))) if value[d] != index[d]]
    dim = differing[0] if differing else 0
    numbers["mismatch_dim"] = dim
    if len(value) > dim and len(index) > dim:
        if dim == 0:
            numbers["rows"], numbers["tokens"] = value[0], index[0]
        else:
            numbers["value_length"], numbers["index_length"] = value[dim], index[dim]
    kind = "scatter_shape" if dim == 0 else "position_shape"
    return ObservedError(kind, numbers, match.group(0))


def _features(match: re.Match[str]) -> ObservedError:
    modality = "video" if match.group(1).lower().startswith("video") else "image"
    numbers = {"tokens": int(match.group(2)), "rows": int(match.group(3))}
    return ObservedError("feature_count", numbers, match.group(0), modality=modality)


def _gathered(match: re.Match[str]) -> ObservedError:
    numbers = {"tokens": int(match.group(1)), "rows": int(match.group(2))}
    return ObservedError("gathered_count", numbers, match.group(0), scope="all ranks")


def _local_rows(match: re.Match[str]) -> ObservedError:
    numbers = {"tokens": int(match.group(1)), "rows": int(match.group(2))}
    return ObservedError("local_rows", numbers, match.group(0))


def _sizes(match: re.Match[str]) -> ObservedError:
    numbers = {"dim": int(match.group(1)), "expected": int(match.group(2)), "got": int(match.group(3))}
    return ObservedError("cat_sizes", numbers, match.group(0))


def _divisible(match: re.Match[str]) -> ObservedError:
    numbers = {"length": int(match.group(1)), "cp": int(match.group(2))}
    return ObservedError("not_divisible", numbers, match.group(0))


def _expanded(match: re.Match[str]) -> ObservedError:
    numbers = {"target": int(match.group(1)), "existing": int(match.group(2)), "dim": int(match.group(3))}
    return ObservedError("expanded_size", numbers, match.group(0))


def _fixed(kind: str) -> Parser:
    def parse(match: re.Match[str]) -> ObservedError:
        return ObservedError(kind, {}, match.group(0))
    return parse


def _named(kind: str, names: tuple[str, ...], scope: str = "rank") -> Parser:
    """A parser storing the match's groups as ints under ``names`` (a missing optional group is left out)."""
    def parse(match: re.Match[str]) -> ObservedError:
        numbers: dict[str, Any] = {}
        for name, value in zip(names, match.groups()):
            if value is None:
                continue
            numbers[name] = int(value) if re.fullmatch(r"-?\d+", value) else value
        return ObservedError(kind, numbers, match.group(0), scope=scope)
    return parse


def _view(match: re.Match[str]) -> ObservedError:
    shape = [int(part) for part in re.findall(r"-?\d+", match.group(1))]
    return ObservedError("view_size", {"shape": shape, "size": int(match.group(2))}, match.group(0))


def _apply_kwarg(match: re.Match[str]) -> ObservedError:
    return ObservedError("apply_kwarg", {}, match.group(0))


Parser = Callable[[re.Match[str]], ObservedError]
PATTERNS: tuple[tuple[str, re.Pattern[str], Parser], ...] = (
    ("scatter_shape", re.compile(r"shape mismatch: value tensor of shape " + _SHAPE
                                 + r" cannot be broadcast to indexing result of shape " + _SHAPE), _scatter),
    ("feature_count", re.compile(r"(Images?|Videos?) features and (?:image|video) tokens do not match[:,]?\s*"
                                 r"tokens\s*[:=]\s*(\d+),?\s*features\s*[:=]?\s*(\d+)", re.IGNORECASE), _features),
    ("gathered_count", re.compile(r"Packed CP ranks contain (\d+) vision tokens, but the vision encoder "
                                  r"produced (\d+) embeddings"), _gathered),
    ("local_rows", re.compile(r"Mismatch between local vision token count and local vision embedding rows:\s*"
                              r"expected=(\d+),\s*got=(\d+)"), _local_rows),
    ("cat_sizes", re.compile(r"Sizes of tensors must match except in dimension (\d+)\.\s*"
                             r"Expected size (\d+) but got size (\d+)"), _sizes),
    ("not_divisible", re.compile(r"Packed sequence length (\d+) must be divisible by 2 \* CP size (\d+)"),
     _divisible),
    ("expanded_size", re.compile(r"The expanded size of the tensor \((\d+)\) must match the existing size "
                                 r"\((\d+)\) at non-singleton dimension (\d+)"), _expanded),
    ("apply_kwarg", re.compile(r"apply\(\) takes no keyword arguments"), _apply_kwarg),
    ("bridge_divisible", re.compile(r"Pre-sharded packed CP inputs require every physical segment length to be "
                                    r"divisible by 2 \* cp_size"), _fixed("bridge_divisible")),
    ("bridge_offset", re.compile(r"metadata must start at token offset 0"), _fixed("bridge_offset")),
    ("bridge_mask_length", re.compile(r"vision mask length does not match the global packed-sequence metadata"),
     _fixed("bridge_mask_length")),
    ("bridge_mrope", re.compile(r"require explicit rank-local 3D MRoPE position_ids"), _fixed("bridge_mrope")),
    ("cp_group", re.compile(r"Context-parallel group has rank (\d+) and size (\d+), but rank (\d+) and size (\d+) "
                            r"were requested"),
     _named("cp_group", ("group_rank", "group_size", "requested_rank", "requested_size"))),
    ("view_size", re.compile(r"shape '\[([-\d,\s]*)\]' is invalid for input of size (\d+)"), _view),
    ("dim_range", re.compile(r"Dimension out of range \(expected to be in range of \[(-?\d+), (-?\d+)\], but got "
                             r"(-?\d+)\)"), _named("dim_range", ("low", "high", "dim"))),
    ("rank_tokens", re.compile(r"CP rank (\d+) has (\d+) tokens, expected (\d+) from cu_seqlens"),
     _named("rank_tokens", ("cp_rank", "got", "expected"))),
    ("token_features", re.compile(r"token/features mismatch: (\d+) tokens, (\d+) features"),
     _named("token_features", ("tokens", "rows"))),
    ("audio_count", re.compile(r"Audio features and audio tokens do not match(?:[:,]?\s*tokens\s*[:=]\s*(\d+),?\s*"
                               r"features\s*[:=]?\s*(\d+))?", re.IGNORECASE),
     _named("audio_count", ("tokens", "rows"))),
    ("gloo_mismatch", re.compile(r"op\.preamble\.length <= op\.nbytes\.\s*(\d+) vs (\d+)"),
     _named("gloo_mismatch", ("sent_bytes", "expected_bytes"))),
    ("nccl_timeout", re.compile(r"Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=(\d+), "
                                r"OpType=(\w+)(?:, NumelIn=(\d+), NumelOut=(\d+))?"),
     _named("nccl_timeout", ("seq", "op", "numel_in", "numel_out"))),
)
KINDS = tuple(kind for kind, _, _ in PATTERNS)


def parse_line(line: str, line_number: int | None = None) -> ObservedError | None:
    """The error one line states, or None; the last recognised form on the line wins."""
    clean = _ANSI.sub("", line)
    best: tuple[int, ObservedError] | None = None
    for _, pattern, parse in PATTERNS:
        for match in pattern.finditer(clean):
            if best is None or match.start() >= best[0]:
                best = (match.start(), parse(match))
    if best is None:
        return None
    rank = _RANK_PREFIX.search(clean[: best[0]])
    observed = best[1]
    return ObservedError(observed.kind, observed.numbers, observed.line, observed.scope,
                         int(rank.group(1)) if rank else None, line_number, observed.modality)


def last_error(lines: Iterable[str]) -> ObservedError | None:
    """The last recognised error in ``lines`` (streamed: a long log costs constant memory)."""
    found = None
    for number, line in enumerate(lines, start=1):
        observed = parse_line(line, number)
        if observed is not None:
            found = observed
    return found


def parse_error_text(text: str) -> ObservedError | None:
    """The error stated by ``text`` (one message or a pasted log), or None if no form matches."""
    observed = last_error(text.splitlines())
    if observed is not None and "\n" not in text.strip():
        return ObservedError(observed.kind, observed.numbers, observed.line, observed.scope, observed.rank,
                             None, observed.modality)
    return observed


def read_error_log(path: str | Path) -> ObservedError | None:
    """The last recognised error line of a log file, or None; a missing file is an exit-2 error."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"the error file {path} does not exist", where="--error-file",
                         fix="pass the path of the training log (or paste the message with --error)")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a log file", where="--error-file",
                         fix="pass the log file itself, e.g. --error-file logs/train.log")
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return last_error(handle)
    except OSError as exc:
        raise InputError(f"the error file {path} could not be read ({exc.strerror or exc})", where="--error-file",
                         fix="check the file's permissions") from None
