"""Fields inside nested dicts and objects, addressed by dotted paths (``packed_seq_params.cu_seqlens_q``).

Stacks hand the model nested containers: a Megatron-Bridge dict holding a ``PackedSeqParams``,
verl's ``batch.*`` / ``multi_modal_inputs.*``, ``model_inputs.*``. :func:`flatten` lists every
leaf under its dotted path; loading then looks fields up by path (``--key`` takes dotted paths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cpinspect.core.unpickle import StandIn

MAX_DEPTH = 4


def flatten(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(leaves, containers)``: every non-container value under its dotted path, and the class of
    each object container (``{"packed_seq_params": "megatron.core.packed_seq_params.PackedSeqParams"}``).

    Top-level keys come first, then deeper paths (so a top-level ``input_ids`` wins over a nested one).
    """
    leaves: dict[str, Any] = {}
    containers: dict[str, str] = {}
    level: list[tuple[str, Any]] = [(str(k), v) for k, v in raw.items()]
    for _ in range(MAX_DEPTH):
        deeper: list[tuple[str, Any]] = []
        for path, value in level:
            inner = children(value)
            if inner is None:
                leaves[path] = value
                continue
            containers[path] = value.class_path if isinstance(value, StandIn) else type(value).__name__
            deeper.extend((f"{path}.{k}", v) for k, v in inner.items())
        level = deeper
    for path, value in level:
        leaves[path] = value
    return leaves, containers


def children(value: Any) -> dict[str, Any] | None:
    """The named members of a dict, a stand-in object or a plain object with a ``__dict__``; else None."""
    if isinstance(value, StandIn):
        return {str(k): v for k, v in value.fields.items()}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return {name: getattr(value, name, None) for name in value.__dataclass_fields__}
    return None


def by_name(leaves: Mapping[str, Any], name: str, *, prefer: str = "") -> str | None:
    """The path of the leaf called ``name`` (a top-level key, else the shallowest nested one; ``prefer``
    names a container to look in first). None-valued leaves do not count (Bridge's unpadded form
    saves ``cu_seqlens_q_padded=None``)."""
    if prefer and leaves.get(f"{prefer}.{name}") is not None:
        return f"{prefer}.{name}"
    if leaves.get(name) is not None:
        return name
    nested = [p for p, v in leaves.items() if v is not None and p.rsplit(".", 1)[-1] == name]
    return min(nested, key=lambda p: p.count(".")) if nested else None
