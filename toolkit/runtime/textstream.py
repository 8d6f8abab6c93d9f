"""Incremental detokenization: turn a stream of token ids into a stream of text pieces.

Byte-level BPE tokens can end mid-way through a UTF-8 character; a piece is emitted only once the text
decoded so far no longer ends in an incomplete character (U+FFFD), so streamed output equals the full
decode.
"""

from __future__ import annotations

from typing import Iterable, Iterator


def stream_text(tok, ids: Iterable[int]) -> Iterator[str]:
    seen: list[int] = []
    emitted = 0
    text = ""
    for i in ids:
        seen.append(i)
        text = tok.decode(seen, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            continue
        if len(text) > emitted:
            yield text[emitted:]
            emitted = len(text)
    if len(text) > emitted:
        yield text[emitted:]
