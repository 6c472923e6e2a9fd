"""Framework objects in a ``.pt``, loaded without importing their module or running anything.

A Megatron-Bridge batch is often ``torch.save({"input_ids": ids, "packed_seq_params": psp})``
with ``psp`` a ``PackedSeqParams`` dataclass; verl/miles/slime save their own containers. Plain
``weights_only=True`` refuses them. Here the globals the file names (listed statically by
``torch.serialization.get_unsafe_globals_in_checkpoint``, nothing run) get *inert stand-ins*: a
class that only stores the pickled state. They are allowlisted for torch's weights-only unpickler,
which still refuses every other global (``os.system``, ``eval``, ...).

A stand-in can be built the way pickle builds a plain object (NEWOBJ then BUILD); calling it
(REDUCE, which is how ``__reduce__`` payloads run code) raises. Globals whose module runs code or
whose name is not class-like are never given a stand-in.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# modules whose globals are never stood in for, even when the name looks like a class
DENIED_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "shutil", "runpy", "pickle",
    "_pickle", "marshal", "socket", "ctypes", "code", "codeop", "pty", "importlib", "types", "copyreg",
    "functools", "operator", "io", "_io", "pathlib", "tempfile", "webbrowser", "multiprocessing",
    "threading", "signal", "asyncio", "inspect", "gc", "platform", "sysconfig", "pdb", "timeit",
    "torch", "numpy", "typing", "dataclasses", "abc", "collections", "_codecs", "codecs", "zipfile",
    "tarfile", "urllib", "http", "ftplib", "smtplib", "telnetlib", "xmlrpc", "site", "distutils", "setuptools",
    "pip", "cpinspect",
})


class StandInCallError(pickle.UnpicklingError):
    """A stand-in was called (REDUCE), which only a code-running payload needs."""


class StandIn:
    """Inert holder of one pickled object's state: its class name and its attributes, nothing else."""

    _class_path = "?"
    _state: dict[str, Any]
    _args: tuple[Any, ...]

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        inst = object.__new__(cls)
        object.__setattr__(inst, "_state", {})
        object.__setattr__(inst, "_args", tuple(args))
        return inst

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # only reached when the pickle *calls* the class (REDUCE); NEWOBJ does not call __init__
        raise StandInCallError(
            f"the file calls {self._class_path}(...) while unpickling, which cpinspect never does"
        )

    def __setstate__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
        if isinstance(state, dict):
            self._state.update({str(k): v for k, v in state.items()})
        elif state is not None:
            self._state["state"] = state
        if isinstance(slots, dict):
            self._state.update({str(k): v for k, v in slots.items()})

    @property
    def fields(self) -> dict[str, Any]:
        """The pickled attributes (as saved)."""
        return dict(self._state)

    @property
    def class_path(self) -> str:
        return self._class_path

    def __repr__(self) -> str:
        return f"<stand-in for {self._class_path}: {', '.join(self._state)}>"


def refusal(path: str) -> str | None:
    """Why the global ``module.Name`` gets no stand-in, or None when it may get one."""
    module, _, name = path.rpartition(".")
    root = module.split(".")[0]
    if not module or not name:
        return f"{path} is not a module-qualified class name"
    if root in DENIED_MODULES or module in DENIED_MODULES:
        return f"{path} comes from the module {module}, which cpinspect never stands in for (it can run code)"
    if not name[0].isupper() or not name.replace("_", "").isalnum():
        return f"{path} is not a class name (a function or a callable would be called while unpickling)"
    return None


def make_stand_in(path: str) -> type[StandIn]:
    """A fresh stand-in class named like the global ``path`` (module and qualified name)."""
    module, _, name = path.rpartition(".")
    return type(name, (StandIn,), {"__module__": module, "__qualname__": name, "_class_path": path})


@contextmanager
def stand_ins(paths: list[str]) -> Iterator[dict[str, type[StandIn]]]:
    """Allowlist stand-ins for ``paths`` in torch's weights-only unpickler while the block runs."""
    classes = {path: make_stand_in(path) for path in paths}
    entries: list[Any] = [(cls, path) for path, cls in classes.items()]
    with torch.serialization.safe_globals(entries):
        yield classes

