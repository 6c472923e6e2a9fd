"""Where in the *user's* code something happened: the one frame finder every report uses.

A collective's call site, a traceback's raising line and the line a rank returned from are all
"the innermost frame that is neither torch (with the wrappers it installs, such as the
``typing_extensions.deprecated`` shim around ``all_gather_into_tensor``) nor cpinspect's own
machinery". Frames without a real file (``<frozen importlib._bootstrap>``, ``<string>``) are never
a place to show.
"""

from __future__ import annotations

import os
import sys
from types import FrameType, TracebackType

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _library_dirs() -> tuple[str, ...]:
    import torch
    import typing_extensions

    return (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
            os.path.abspath(typing_extensions.__file__), os.path.dirname(os.path.abspath(__file__)) + os.sep)


def is_user_path(raw: str, *, include_cpinspect: bool = True) -> bool:
    """True for a frame of user code; ``include_cpinspect=False`` also skips all of cpinspect."""
    if raw.startswith("<"):
        return False
    path = os.path.abspath(raw)
    if path.startswith(_library_dirs()):
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
