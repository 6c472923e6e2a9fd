"""Import the user's selection function from ``path/to/file.py:function`` or ``package.module:function``.

Importing user code runs it; any failure while doing so is the user's to fix, so it becomes one
:class:`~cpinspect.core.errors.InputError` paragraph naming the line that raised (exit 2).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpinspect.core.errors import InputError
from cpinspect.groups.callsite import error_site, short_path


def load_function(spec: str) -> Callable[..., Any]:
    """``path/to/file.py:function`` or ``package.module:function`` (``Class.method`` allowed)."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise InputError(
            f"{spec!r} does not name a function",
            where="the IMPLEMENTATION argument",
            fix="write path/to/file.py:function or package.module:function",
        )
    looks_like_file = module_part.endswith(".py") or "/" in module_part or os.sep in module_part
    module = _import_file(Path(module_part)) if looks_like_file else _import_module(module_part)
    obj: Any = module
    for name in attr.split("."):
        if not hasattr(obj, name):
            found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise InputError(
                f"{module_part} has no attribute {attr!r}",
                where=spec,
                fix=f"name one of its callables: {', '.join(found[:12]) or '(none defined)'}",
            )
        obj = getattr(obj, name)
    if not callable(obj):
        raise InputError(
            f"{spec} is a {type(obj).__name__}, not a function",
            where=spec,
            fix="point at the selection function itself",
        )
    return obj


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"the file {path} does not exist", where=str(path), fix="check the path before the ':'")
    name = f"_cpinspect_user_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"{path} cannot be imported as Python", where=str(path), fix="pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    if folder not in sys.path:  # lets the file import its neighbours, as `python file.py` would
        sys.path.insert(0, folder)
    _execute_import(lambda: spec.loader.exec_module(module), str(path))  # type: ignore[union-attr]
    return module


def _import_module(name: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return _execute_import(lambda: importlib.import_module(name), name)


def _execute_import(load: Callable[[], Any], what: str) -> Any:
    try:
        return load()
    except SyntaxError as exc:
        raise InputError(f"{what} does not import: SyntaxError: {exc.msg}", where=f"{exc.filename}:{exc.lineno}",
                         fix="fix the syntax error") from None
    except ModuleNotFoundError as exc:
        missing = exc.name or str(exc)
        fix = ("pass a file path (path/to/file.py:function), or run from the folder that holds the package"
               if what.startswith(str(missing)) else f"install {missing} in this environment")
        raise InputError(f"importing {what} failed: No module named {missing!r}", where=_raising_line(exc, what),
                         fix=fix) from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import-time failure of user code is a usage error
        raise InputError(f"importing {what} raised {type(exc).__name__}: {exc}", where=_raising_line(exc, what),
                         fix=f"make {what} importable on its own (run it with python to see the traceback)") from None


def _raising_line(exc: BaseException, what: str) -> str:
    """The user's line that raised while importing ``what`` (``what`` itself when none is theirs)."""
    return error_site(exc, include_cpinspect=False) or what


def target_name(fn: Callable[..., Any]) -> str:
    """``module:qualname``, or ``path/file.py:qualname`` for a function loaded from a file."""
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or repr(fn)
    path = getattr(sys.modules.get(module), "__file__", None)
    if path and (module == "__main__" or module.startswith("_cpinspect_user_")):
        return f"{short_path(path)}:{name}"
    return f"{module}:{name}"
