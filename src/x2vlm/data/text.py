"""Text cleaning applied to captions and questions before tokenisation (spec §3.3.2)."""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"""([,.'!?"()*#:;~])""")
_WHITESPACE_RUNS = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int) -> str:
    """Lower-case; replace ``, . ' ! ? " ( ) * # : ; ~`` and ``-`` ``/`` by spaces;
    ``<person>`` -> ``person``; collapse whitespace runs; strip; keep ``max_words`` words.

    Raises ``ValueError`` when nothing is left.
    """
    cleaned = _PUNCTUATION.sub(" ", text.lower())
    cleaned = cleaned.replace("-", " ").replace("/", " ").replace("<person>", "person")
    cleaned = _WHITESPACE_RUNS.sub(" ", cleaned)
    cleaned = cleaned.rstrip("\n").strip(" ")
    words = cleaned.split(" ")
    if len(words) > max_words:
        cleaned = " ".join(words[:max_words])
    if not cleaned:
        raise ValueError(f"pre_caption leaves no text (raw: {text!r})")
    return cleaned


def pre_question(text: str, max_words: int) -> str:
    """Like ``pre_caption`` for the punctuation, but without collapsing whitespace: lower-case,
    punctuation and ``-`` ``/`` to spaces, strip trailing spaces, keep ``max_words`` words
    (words are split on single spaces, as in the official code)."""
    cleaned = _PUNCTUATION.sub(" ", text.lower()).replace("-", " ").replace("/", " ")
    cleaned = cleaned.rstrip(" ")
    words = cleaned.split(" ")
    if len(words) > max_words:
        cleaned = " ".join(words[:max_words])
    return cleaned
