"""Redaction of text that arrives in pieces (a streaming model's deltas).

``redact_text`` on each piece alone would let a secret through when a provider splits it
across two pieces (``"sk-abc"`` then ``"def123..."``). A :class:`StreamRedactor` holds back
the tail that could still become part of a secret (the last word, a ``Bearer`` waiting for
its token, the start of a registered secret) and redacts the rest with the one pass, so
the pieces it lets out, joined, are as masked as the whole text would be. The held-back
tail goes out with the next piece that ends it, or with :meth:`flush` at the end.
"""

from __future__ import annotations

import string

from .logging import redact_text, registered_secrets

_TOKEN = frozenset(string.ascii_letters + string.digits + "._~+/=-")
"""Characters of an ``sk-...`` key or a bearer token (see logging's patterns)."""


class StreamRedactor:
    """Redacts one text stream (an answer, or one tool call's arguments), piece by piece."""

    __slots__ = ("_one_word", "_pending")

    def __init__(self) -> None:
        self._pending = ""
        self._one_word = False
        """The held-back text is one word of token characters: ``safe_cut`` of it is 0."""

    def feed(self, piece: str) -> str:
        """The redacted text that is safe to show now ("" while it is all held back)."""
        if self._one_word and _is_word(piece):
            # Still one word (a long key, a base64 blob): it all stays held back, as safe_cut
            # would say, without rescanning the word for every piece (quadratic otherwise).
            self._pending += piece
            return ""
        pending = self._pending + piece
        cut = safe_cut(pending, registered_secrets())
        self._pending = pending[cut:]
        self._one_word = _is_word(self._pending)
        return redact_text(pending[:cut]) if cut else ""

    def flush(self) -> str:
        """The rest, redacted: the text is complete."""
        rest, self._pending, self._one_word = self._pending, "", False
        return redact_text(rest) if rest else ""


def _is_word(text: str) -> bool:
    return bool(text) and all(c in _TOKEN for c in text)


def safe_cut(text: str, secrets: tuple[str, ...] = ()) -> int:
    """The longest prefix of ``text`` whose redaction cannot change with what comes next."""
    cut = len(text)
    while cut and text[cut - 1] in _TOKEN:  # the last word may still grow into a key
        cut -= 1
    end = cut
    while end and text[end - 1].isspace():
        end -= 1
    if end < cut:  # "Bearer " (then its token, still to come) stays together
        start = end
        while start and text[start - 1] in _TOKEN:
            start -= 1
        if text[start:end].lower().endswith("bearer"):
            cut = start
    moved = bool(secrets)
    while moved:  # no registered secret may straddle the cut, complete or still arriving
        moved = False
        for secret in secrets:
            start = text.find(secret[0], max(0, cut - len(secret) + 1), cut)
            while start != -1:
                if secret.startswith(text[start:start + len(secret)]):
                    cut, moved = start, True
                    break
                start = text.find(secret[0], start + 1, cut)
    return cut
