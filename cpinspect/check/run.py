"""Run one case: the user's function, unmodified, on each of its simulated ranks.

Each rank calls the function through a signature adapter (:mod:`cpinspect.check.signatures`) on
its own thread of :func:`cpinspect.groups.simulated.execute_spmd`, which fingerprints every
collective and never waits past the timeout; :func:`cpinspect.check.verdicts.judge` then compares
each rank's rows with the oracle.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from cpinspect.check.cases import Case
from cpinspect.check.signatures import SIGNATURES, RankInputs, Signature, get_signature
from cpinspect.check.verdicts import CaseResult, Returned, judge
from cpinspect.groups.callsite import error_site, site
from cpinspect.groups.coordinator import RankState
from cpinspect.groups.simulated import execute_spmd

DEFAULT_TIMEOUT_S = 5.0

_IN_RANK = threading.local()


class _ReturnSite:
    """Records where ``fn`` returns, through a per-thread profile hook (for "returned at file:line")."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        target = getattr(fn, "__func__", fn)
        method = vars(type(target)).get("__call__")  # a callable object: its __call__ is the function
        self.code: types.CodeType | None = getattr(target, "__code__", None) or getattr(method, "__code__", None)
        self.site = ""

    def _profile(self, frame: types.FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "return" and code is self.code:
            self.site = site(code.co_filename, frame.f_lineno)

    def __enter__(self) -> _ReturnSite:
        if self.code is not None:
            sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(None)


def _rank_program(group: Any, adapter: Callable[..., Any], fn: Callable[..., Any], local_masks: torch.Tensor,
                  cu: torch.Tensor, logical: torch.Tensor, count: int, threads: list[int],
                  local_ids: torch.Tensor, local_cp_size: torch.Tensor | None = None) -> Returned:
    """What each simulated rank runs: fresh copies of its inputs, then the user's function."""
    threads.append(threading.get_ident())
    rank = group.rank()
    sizes = None if local_cp_size is None else local_cp_size.clone()
    inputs = RankInputs(local_masks[rank].clone(), cu.clone(), logical.clone(), count, local_ids[rank].clone(), sizes)
    _IN_RANK.active = True
    try:
        with _ReturnSite(fn) as returned:
            value = adapter(fn, inputs, group)
    finally:
        _IN_RANK.active = False
    return Returned(value, returned.site)


@contextlib.contextmanager
def keyword_apply_rejected(enabled: bool = True) -> Iterator[None]:
    """Inside simulated ranks, make ``autograd.Function.apply(..., kw=...)`` fail as older torch does.

    torch releases before pytorch/pytorch#182206 raise ``TypeError: apply() takes no keyword
    arguments`` (Megatron-Bridge #4391, #4784: ``cp_group=`` passed to the vision all-gather); newer
    ones accept it, so a check on a new torch would miss a crash on the torch a training stack pins.
    """
    if not enabled:
        yield
        return
    function_cls = torch.autograd.Function
    original = function_cls.__dict__["apply"]

    def strict_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if kwargs and getattr(_IN_RANK, "active", False):
            names = ", ".join(kwargs)
            raise TypeError(
                f"{cls.__name__}.apply() was called with keyword argument(s) {names}: apply() takes no keyword "
                f"arguments on torch releases before pytorch/pytorch#182206, so this crashes there "
                f"(Megatron-Bridge #4391); pass {names} positionally"
            )
        return original.__get__(None, cls)(*args, **kwargs)

    function_cls.apply = classmethod(strict_apply)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        function_cls.apply = original  # type: ignore[method-assign]


def _abandon(threads: Sequence[int]) -> None:
    """Raise SystemExit inside rank threads still stuck in user code after a timeout (best effort)."""
    alive = {t.ident for t in threading.enumerate() if t.is_alive()}
    for ident in threads:
        if ident in alive:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(SystemExit))


def run_case(fn: Callable[..., Any], case: Case, signature: Signature | str = "default", *,
             timeout: float = DEFAULT_TIMEOUT_S, strict_apply: bool = True) -> CaseResult:
    """Run ``fn`` on every rank of ``case`` and judge each rank against the oracle."""
    signature = get_signature(signature) if isinstance(signature, str) else signature
    local_masks = case.local_masks()
    cu = case.cu_seqlens.to(torch.int32)
    logical = case.logical_or_physical.to(torch.int32)
    threads: list[int] = []
    with keyword_apply_rejected(strict_apply):
        states, failure = execute_spmd(case.cp, _rank_program, signature.call, fn, local_masks, cu, logical,
                                       case.vision_embed_count, threads, case.input_ids[case.global_indices()],
                                       None if case.segment_cp is None else case.segment_cp.to(torch.int32),
                                       timeout=timeout)
    result = (signature.judge or judge)(case, states, failure)  # before abandoning: a stopped thread updates its state
    if _call_mismatch(states):
        result.summary += (f"; the call itself failed: does the function take the {signature.name!r} signature? "
                           f"(--signature: {', '.join(SIGNATURES)})")
    if failure is not None and failure.kind == "timeout":
        _abandon(threads)
    return result


def _call_mismatch(states: list[RankState]) -> bool:
    """Every rank raised TypeError before entering user code: the signature does not fit."""
    return all(isinstance(s.error, TypeError) and not error_site(s.error, include_cpinspect=False) for s in states)
