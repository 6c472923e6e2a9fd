"""How ``cpinspect check`` calls a user's selection function: one small adapter per convention.

Every adapter receives the same neutral per-rank inputs (:class:`RankInputs`) and the rank's
process group, and calls the user's function the way its framework would. Adding a convention is
a few lines::

    @register_signature("my-stack", "fn(mask, cu_seqlens, group) -> LongTensor")
    def _call_my_stack(fn, inputs, cp_group):
        return fn(inputs.vision_mask, inputs.cu_seqlens, cp_group)

Torch is imported lazily so that the CLI can list the names for ``--help``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from cpinspect.core.errors import InputError

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist


@dataclass(frozen=True)
class RankInputs:
    """What one CP rank knows before selecting its rows (fresh copies for every call).

    ``vision_mask`` is the rank's local bool mask ``[cu_seqlens[-1] // cp]``; ``cu_seqlens`` and
    ``logical_cu_seqlens`` are the global physical and logical boundaries ``[S + 1]`` (int32, as
    Megatron passes them), identical on every rank.
    """

    vision_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    logical_cu_seqlens: torch.Tensor
    vision_embed_count: int


@dataclass
class PackedSeqParams:
    """Shaped like Megatron-Core's ``PackedSeqParams`` for the THD format (fields a selection reads).

    ``cu_seqlens_*`` are logical boundaries, ``cu_seqlens_*_padded`` physical ones; the fields a
    vision selection never reads keep Megatron's ``None`` defaults so attribute access still works.
    """

    qkv_format: str = "thd"
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_kv: Optional[torch.Tensor] = None
    cu_seqlens_q_padded: Optional[torch.Tensor] = None
    cu_seqlens_kv_padded: Optional[torch.Tensor] = None
    max_seqlen_q: Optional[int] = None
    max_seqlen_kv: Optional[int] = None
    local_cp_size: Optional[int] = None
    cp_group: Any = None
    total_tokens: Optional[int] = None
    seq_idx: Optional[torch.Tensor] = None
    tokens_per_sample: Optional[int] = None
    pad_between_seqs: Optional[bool] = None
    cp_scatter_cache: Any = None


Adapter = Callable[[Callable[..., Any], RankInputs, "dist.ProcessGroup"], Any]


@dataclass(frozen=True)
class Signature:
    """A named calling convention: ``call(fn, inputs, cp_group)`` returns what ``fn`` returned."""

    name: str
    summary: str
    call: Adapter


SIGNATURES: dict[str, Signature] = {}


def register_signature(name: str, summary: str) -> Callable[[Adapter], Adapter]:
    """Decorator: make ``adapter`` available as ``--signature name``."""

    def add(adapter: Adapter) -> Adapter:
        SIGNATURES[name] = Signature(name, summary, adapter)
        return adapter

    return add


def get_signature(name: str) -> Signature:
    """The adapter called ``name``; an exit-2 error listing the known names otherwise."""
    if name not in SIGNATURES:
        raise InputError(
            f"unknown signature {name!r}",
            where="--signature",
            fix=f"use one of {', '.join(SIGNATURES)}",
        )
    return SIGNATURES[name]


@register_signature(
    "default",
    "fn(vision_mask, cu_seqlens, *, vision_embed_count, cp_group) -> LongTensor; vision_mask is the local "
    "bool mask [local_T], cu_seqlens the global physical boundaries",
)
def _call_default(fn: Callable[..., Any], inputs: RankInputs, cp_group: dist.ProcessGroup) -> Any:
    return fn(inputs.vision_mask, inputs.cu_seqlens, vision_embed_count=inputs.vision_embed_count, cp_group=cp_group)


@register_signature(
    "megatron-bridge",
    "fn(vision_mask, packed_seq_params, *, vision_embed_count, cp_group, embed_device) -> LongTensor; "
    "vision_mask is [1, local_T] as Qwen3VLModel.forward passes it, packed_seq_params a PackedSeqParams "
    "(qkv_format='thd', logical cu_seqlens_q/kv, physical cu_seqlens_q/kv_padded, max_seqlen_q/kv)",
)
def _call_megatron_bridge(fn: Callable[..., Any], inputs: RankInputs, cp_group: dist.ProcessGroup) -> Any:
    import torch

    physical, logical = inputs.cu_seqlens, inputs.logical_cu_seqlens
    longest = int((physical[1:] - physical[:-1]).max()) if physical.numel() > 1 else 0
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=logical,
        cu_seqlens_kv=logical.clone(),
        cu_seqlens_q_padded=physical,
        cu_seqlens_kv_padded=physical.clone(),
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    return fn(
        inputs.vision_mask.view(1, -1),
        params,
        vision_embed_count=inputs.vision_embed_count,
        cp_group=cp_group,
        embed_device=torch.device("cpu"),
    )
