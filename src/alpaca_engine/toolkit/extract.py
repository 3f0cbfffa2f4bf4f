"""Readable text out of HTML: trafilatura for the article, a plain parser as the fallback.

Models read pages through this, so it drops what costs tokens and carries no meaning (menus,
footers, scripts). trafilatura returns nothing for pages without an article-like body (a short
landing page, a listing); the stdlib fallback then keeps all visible text rather than none.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from html.parser import HTMLParser

__all__ = ["Readable", "extract_readable", "html_to_text"]

log = logging.getLogger(__name__)

_SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head", "iframe", "object"})
_BLOCK = frozenset({
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption",
    "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav",
    "ol", "p", "pre", "section", "table", "td", "th", "tr", "ul",
})
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


@dataclass(frozen=True)
class Readable:
    title: str | None
    text: str


class _TextParser(HTMLParser):
    """Collect the ``<title>`` and the visible text, with line breaks at block elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._skip_depth = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _SKIP:
            self._skip_depth += 1
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        elif not self._skip_depth:
            self.parts.append(data)

    def text(self) -> str:
        return _tidy("".join(self.parts))

    def title(self) -> str | None:
        title = " ".join("".join(self.title_parts).split())
        return title or None


def _tidy(text: str) -> str:
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n", "\n".join(lines)).strip()


def _parse(html: str) -> _TextParser:
    parser = _TextParser()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # pragma: no cover - HTMLParser is lenient; keep what was parsed
        log.debug("html parser gave up part way", exc_info=True)
    return parser


def html_to_text(html: str) -> str:
    """All visible text of ``html`` (no scripts or styles), one block element per line."""
    return _parse(html).text()


def extract_readable(html: str, url: str | None = None) -> Readable:
    """The page title and its main text; falls back to all visible text if none is found."""
    parser = _parse(html)
    text: str | None = None
    if html.strip():
        try:
            import trafilatura  # here: its import costs ~0.3 s every CLI command would pay

            text = trafilatura.extract(
                html, url=url, include_comments=False, include_tables=True, deduplicate=False
            )
        except Exception:  # a malformed tree must not cost the whole page
            log.debug("trafilatura failed; using the plain-text fallback", exc_info=True)
    if not text or not text.strip():
        text = parser.text()
    return Readable(title=parser.title(), text=_tidy(text))
