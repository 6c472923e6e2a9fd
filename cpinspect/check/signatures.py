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
    Megatron passes them), identical on every rank. ``input_ids`` are the rank's own local token ids
    ``[local_T]`` (what ``check --reference`` programs read; the row signatures see placeholders).
    """

    vision_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    logical_cu_seqlens: torch.Tensor
    vision_embed_count: int
    input_ids: Optional[torch.Tensor] = None
    local_cp_size: Optional[torch.Tensor] = None  # hybrid CP: ``[S]`` int32, each segment's local cp


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

    @classmethod
    def thd(cls, cu_seqlens: torch.Tensor, cu_seqlens_padded: Optional[torch.Tensor] = None) -> PackedSeqParams:
        """q and kv alike: ``cu_seqlens`` in ``*_q``/``*_kv``, the physical ones (or ``None``) in ``*_padded``."""
        physical = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded
        longest = int((physical[1:] - physical[:-1]).max()) if physical.numel() > 1 else 0
        return cls(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens.clone(),
                   cu_seqlens_q_padded=cu_seqlens_padded,
                   cu_seqlens_kv_padded=None if cu_seqlens_padded is None else cu_seqlens_padded.clone(),
                   max_seqlen_q=longest, max_seqlen_kv=longest)


Adapter = Callable[[Callable[..., Any], RankInputs, "dist.ProcessGroup"], Any]


@dataclass(frozen=True)
class Signature:
    """A named calling convention: ``call(fn, inputs, cp_group)`` returns what ``fn`` returned.

    ``positional`` and ``keywords`` are how the adapter calls (for the fit check before any case
    runs); ``first`` names the first parameter as the stacks spell it (for inferring the signature).
    """

    name: str
    summary: str
    call: Adapter
    positional: int = 2
    keywords: tuple[str, ...] = ()
    first: tuple[str, ...] = ()
    accepts: Callable[[Callable[..., Any]], bool] | None = None  # a fit test of its own (the generic signature)
    judge: Callable[..., Any] | None = None  # judges the ranks' returns itself (check --reference), not as rows


SIGNATURES: dict[str, Signature] = {}
MASK_NAMES = ("vision_mask", "mask", "image_mask", "visual_pos_masks", "local_mask")
IDS_NAMES = ("input_ids", "tokens", "token_ids", "local_input_ids")


def register_signature(name: str, summary: str, *, keywords: tuple[str, ...] = (),
                       first: tuple[str, ...] = ()) -> Callable[[Adapter], Adapter]:
    """Decorator: make ``adapter`` available as ``--signature name``."""

    def add(adapter: Adapter) -> Adapter:
        SIGNATURES[name] = Signature(name, summary, adapter, 2, keywords, first)
        return adapter

    return add


def fits(fn: Callable[..., Any], signature: Signature) -> bool:
    """Whether ``fn``'s parameters accept the call ``signature`` makes (unknown parameters: assume yes)."""
    import inspect

    if signature.accepts is not None:
        return signature.accepts(fn)
    try:
        params = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        params.bind(*([None] * signature.positional), **{k: None for k in signature.keywords})
    except TypeError:
        return False
    return True


def infer_signature(fn: Callable[..., Any]) -> Signature:
    """The one signature ``fn``'s parameters fit (by the call each makes, then by the first parameter's name);
    the exit-2 error, before any case runs, when none or several fit."""
    import inspect

    fitting = [sig for sig in SIGNATURES.values() if fits(fn, sig)]
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = []
    if len(fitting) > 1 and names:
        named = [sig for sig in fitting if names[0] in sig.first and (len(names) < 2 or _second_fits(sig, names[1]))]
        fitting = named or fitting
    if len(fitting) == 1:
        return fitting[0]
    shown = f"({', '.join(names)})" if names else "(unknown parameters)"
    what = "fit no signature" if not fitting else f"fit several signatures ({', '.join(s.name for s in fitting)})"
    raise InputError(
        f"the parameters {shown} of {getattr(fn, '__qualname__', fn)!r} {what} cpinspect knows, so no case was run",
        where="the function given to check",
        fix="pass --signature NAME, or give the function one of these: "
            + "; ".join(f"{s.name}: {s.summary.split(' -> ')[0]}" for s in SIGNATURES.values()),
    )


def _second_fits(sig: Signature, name: str) -> bool:
    if sig.accepts is not None:  # its own fit test already read every name
        return True
    return ("packed_seq_params" in name) == (sig.name != "default")


def check_fits(fn: Callable[..., Any], signature: Signature) -> None:
    """The exit-2 error, before any case runs, when ``fn`` cannot take the call ``signature`` makes."""
    if fits(fn, signature):
        return
    import inspect

    try:
        shown = "(" + ", ".join(inspect.signature(fn).parameters) + ")"
    except (TypeError, ValueError):
        shown = "(unknown)"
    others = [s.name for s in SIGNATURES.values() if s is not signature and fits(fn, s)]
    raise InputError(
        f"the parameters {shown} of {getattr(fn, '__qualname__', fn)!r} cannot take the {signature.name!r} call "
        f"({signature.summary.split(' -> ')[0]}), so no case was run",
        where="--signature",
        fix=(f"the parameters fit --signature {' or '.join(others)}" if others else
             f"give the function the {signature.name} parameters or another --signature ({', '.join(SIGNATURES)})"),
    )


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
    keywords=("vision_embed_count", "cp_group"), first=MASK_NAMES,
)
def _call_default(fn: Callable[..., Any], inputs: RankInputs, cp_group: dist.ProcessGroup) -> Any:
    return fn(inputs.vision_mask, inputs.cu_seqlens, vision_embed_count=inputs.vision_embed_count, cp_group=cp_group)


@register_signature(
    "megatron-bridge",
    "fn(vision_mask, packed_seq_params, *, vision_embed_count, cp_group, embed_device) -> LongTensor; "
    "vision_mask is [1, local_T] as Qwen3VLModel.forward passes it, packed_seq_params a PackedSeqParams "
    "(qkv_format='thd'; padded batches: logical cu_seqlens_q/kv, physical cu_seqlens_q/kv_padded; unpadded "
    "batches, as Bridge builds them: physical cu_seqlens_q/kv and cu_seqlens_q/kv_padded=None; max_seqlen_q/kv)",
    keywords=("vision_embed_count", "cp_group", "embed_device"), first=MASK_NAMES,
)
def _call_megatron_bridge(fn: Callable[..., Any], inputs: RankInputs, cp_group: dist.ProcessGroup) -> Any:
    import torch

    physical, logical = inputs.cu_seqlens, inputs.logical_cu_seqlens
    padded = not torch.equal(physical, logical)  # unpadded batches, as Bridge builds them: no *_padded
    params = PackedSeqParams.thd(logical, physical) if padded else PackedSeqParams.thd(physical)
    return fn(
        inputs.vision_mask.view(1, -1),
        params,
        vision_embed_count=inputs.vision_embed_count,
        cp_group=cp_group,
        embed_device=torch.device("cpu"),
    )


@register_signature(
    "physical-cu",
    "fn(input_ids, packed_seq_params, *, image_token_id, vision_embed_count, cp_group) -> LongTensor; "
    "slime / miles / AReaL: input_ids is the rank's local [1, local_T] token ids (vision placeholders are "
    "image_token_id), packed_seq_params holds the physical boundaries in cu_seqlens_q/kv and "
    "cu_seqlens_q/kv_padded=None",
    keywords=("image_token_id", "vision_embed_count", "cp_group"), first=IDS_NAMES,
)
def _call_physical_cu(fn: Callable[..., Any], inputs: RankInputs, cp_group: dist.ProcessGroup) -> Any:
    from cpinspect.core.tokens import token_config

    image = token_config().image_token_id
    return fn(_local_ids(inputs).view(1, -1), PackedSeqParams.thd(inputs.cu_seqlens), image_token_id=image,
              vision_embed_count=inputs.vision_embed_count, cp_group=cp_group)


TEXT_TOKEN_ID = 1000  # any id that is not a vision placeholder


def _local_ids(inputs: RankInputs) -> torch.Tensor:
    """The rank's local token ids ``[local_T]``: ``image_token_id`` at vision tokens, a text id elsewhere."""
    import torch

    from cpinspect.core.tokens import token_config

    text = torch.full(inputs.vision_mask.shape, TEXT_TOKEN_ID, dtype=torch.long)
    return torch.where(inputs.vision_mask.to(torch.bool), torch.full_like(text, token_config().image_token_id), text)


# --- the generic signature: fn(group, **batch) ------------------------------------------------------------------

GROUP_NAMES = ("group", "cp_group", "process_group", "pg")
BATCH_FIELDS = ("input_ids", "vision_mask", "cu_seqlens", "cu_seqlens_padded", "vision_embed_count",
                "image_token_id", "local_cp_size")


def _generic_fits(fn: Callable[..., Any]) -> bool:
    """The group first (by one of :data:`GROUP_NAMES`), then only batch fields, defaulted or ``**kwargs`` parameters."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional or params[0].name not in GROUP_NAMES:
        return False
    rest = params[1:]
    return all(p.name in BATCH_FIELDS and p.kind != inspect.Parameter.POSITIONAL_ONLY
               or p.default is not inspect.Parameter.empty
               or p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL) for p in rest)


def generic_fields(inputs: RankInputs, input_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """The batch fields the generic signature passes (``input_ids`` [1, local_T]: placeholders unless given)."""
    from cpinspect.core.tokens import token_config

    return {
        "input_ids": (_local_ids(inputs) if input_ids is None else input_ids).view(1, -1),
        "vision_mask": inputs.vision_mask, "cu_seqlens": inputs.logical_cu_seqlens,
        "cu_seqlens_padded": inputs.cu_seqlens, "vision_embed_count": inputs.vision_embed_count,
        "image_token_id": token_config().image_token_id,
        **({} if inputs.local_cp_size is None else {"local_cp_size": inputs.local_cp_size}),
    }


def call_with_fields(fn: Callable[..., Any], args: tuple[Any, ...], batch: dict[str, Any]) -> Any:
    """``fn(*args, **fields)``: every field for a ``**kwargs`` function, else only the fields it names."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn(*args, **batch)
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return fn(*args, **batch)
    return fn(*args, **{p.name: batch[p.name] for p in params if p.name in batch})


def _call_generic(fn: Callable[..., Any], inputs: RankInputs, cp_group: dist.ProcessGroup) -> Any:
    return call_with_fields(fn, (cp_group,), generic_fields(inputs))


SIGNATURES["generic"] = Signature(
    "generic",
    "fn(group, **batch) -> LongTensor; the rank's process group first (named group, cp_group, process_group or pg), "
    "then, as keywords, the fields of the rank's batch the function names (**batch: all): input_ids [1, local_T], "
    "vision_mask [local_T], cu_seqlens (logical) and cu_seqlens_padded (physical) [S+1] int32 as in a batch file, "
    "vision_embed_count, image_token_id; under --layout hybrid also local_cp_size [S] int32 (each segment's cp)",
    _call_generic, 1, (), GROUP_NAMES, _generic_fits,
)
