"""``cpinspect explore``: one self-contained HTML page to play with the layout in a browser.

:func:`~cpinspect.explore.data.page_data` turns a simulation (and the CLI's own JSON for it)
into the document the page embeds; :func:`~cpinspect.explore.page.render_page` inlines it with
the page's script and style (package data under ``assets/``) into one HTML file that needs no
network. The page's script recomputes the layout for any cp / segments / layout the reader picks,
and checks itself against the embedded CLI JSON for the setting it was built with.
"""

from cpinspect.explore.data import DETAIL_TOKENS, page_data, vision_spans
from cpinspect.explore.page import render_page

__all__ = ["DETAIL_TOKENS", "page_data", "render_page", "vision_spans"]
