"""Where in the *user's* code something happened: the one frame finder every report uses.

A collective's call site, a traceback's raising line and the line a rank returned from are all
"the innermost frame that is neither torch (with the wrappers it installs, such as the
``typing_extensions.deprecated`` shim around ``all_gather_into_tensor``) nor cpinspect's own
machinery". The standard library is never the user's line either: wrappers torch applies come from
``functools``, ``contextlib`` and ``warnings`` as well. Frames without a real file (``<frozen
importlib._bootstrap>``, ``<string>``) are never a place to show.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
from types import FrameType, TracebackType

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[str, ...]:
    import torch
    import typing_extensions

    return (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
            os.path.abspath(typing_extensions.__file__), os.path.dirname(os.path.abspath(__file__)) + os.sep)


@functools.lru_cache(maxsize=1)
def _stdlib_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The standard library's directories, and the package directories that may lie below them."""
    stdlib = {os.path.abspath(sysconfig.get_paths()[key]) + os.sep for key in ("stdlib", "platstdlib")}
    packages = {os.path.abspath(sysconfig.get_paths()[key]) + os.sep for key in ("purelib", "platlib")}
    packages |= {os.path.abspath(p) + os.sep for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    return tuple(sorted(stdlib)), tuple(sorted(packages))


def _in_stdlib(path: str) -> bool:
    stdlib, packages = _stdlib_dirs()
    return path.startswith(stdlib) and not path.startswith(packages)


def is_user_path(raw: str, *, include_cpinspect: bool = True) -> bool:
    """True for a frame of user code; ``include_cpinspect=False`` also skips all of cpinspect."""
    if raw.startswith("<"):
        return False
    path = os.path.abspath(raw)
    if path.startswith(_library_dirs()) or _in_stdlib(path):
        return False
    return include_cpinspect or not path.startswith(_PACKAGE_DIR + os.sep)


def short_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else as given."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


def site(filename: str, line: int) -> str:
    """``file:line`` as every report prints it: the frame's file made absolute, then :func:`short_path`."""
    return f"{short_path(os.path.abspath(filename))}:{line}"


def call_site(depth: int = 2, *, include_cpinspect: bool = True) -> str:
    """``file:line`` of the innermost user frame above the caller's ``depth``-th frame."""
    frame: FrameType | None = sys._getframe(depth)
    while frame is not None:
        if is_user_path(frame.f_code.co_filename, include_cpinspect=include_cpinspect):
            return site(frame.f_code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return "<unknown>"


def error_site(exc: BaseException, *, include_cpinspect: bool = True) -> str:
    """``file:line`` of the innermost user frame of ``exc``'s traceback ("" when none)."""
    tb: TracebackType | None = exc.__traceback__
    innermost = ""
    while tb is not None:
        raw = tb.tb_frame.f_code.co_filename
        if is_user_path(raw, include_cpinspect=include_cpinspect):
            innermost = site(raw, tb.tb_lineno)
        tb = tb.tb_next
    return innermost
