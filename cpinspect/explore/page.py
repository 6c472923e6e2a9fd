"""One HTML file from the page's assets and its data: inline script and style, no network at all.

The page's Content-Security-Policy (``default-src 'none'``) forbids fetching anything, so a page
that works offline is not a matter of care but enforced by the browser.
"""

from __future__ import annotations

import html
import json
import re
from importlib import resources
from typing import Any

SCRIPTS = ("model.js", "view.js", "steps.js")


def asset(name: str) -> str:
    """The text of one file under ``cpinspect/explore/assets`` (package data)."""
    return resources.files("cpinspect.explore").joinpath("assets", name).read_text(encoding="utf-8")


def _inline_json(value: Any) -> str:
    """JSON that cannot close its ``<script>`` element early (``</`` and ``<!--`` escaped)."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c")


def render_page(data: dict[str, Any], *, title: str, source: str) -> str:
    """The whole page: ``assets/page.html`` with the CSS, the scripts and ``data`` filled in."""
    scripts = "\n".join(asset(name) for name in SCRIPTS)
    if "</script" in scripts.lower():
        raise ValueError("an explorer script contains '</script', which would end its element early")
    parts = {
        "__TITLE__": html.escape(title),
        "__SOURCE__": html.escape(source),
        "__CSS__": asset("page.css"),
        "__DATA__": _inline_json(data),
        "__JS__": scripts,
    }
    return re.sub(r"__(TITLE|SOURCE|CSS|DATA|JS)__", lambda m: parts[m.group(0)], asset("page.html"))
