"""Streaming text: incremental detokenization and stop strings.

``Detokenizer`` turns a request's tokens into text as they arrive, decoding only a short window
(the tokens since the last emitted text, with the ones before as context) so a long output costs
O(tokens), and holding back text that ends in an incomplete UTF-8 character (``\\ufffd``). The
concatenated deltas equal ``tokenizer.decode(all tokens)`` for the usual tokenizers.
``StopStrings`` ends a text stream at the first stop string, holding back the few characters that
could begin one so that no part of a stop string is ever sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union


class Detokenizer:
    """``add(new_ids, final) -> str``: the text the new tokens add (``tokenizer``: ``decode(ids)``)."""

    def __init__(self, tokenizer):
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window: tokens before it are fully emitted
        self._read = 0  # tokens whose text has been emitted

    def add(self, new_ids: Sequence[int], final: bool = False) -> str:
        self._ids.extend(new_ids)
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or a character split across tokens: wait for the next one
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]


class StopStrings:
    """``add(delta, final) -> (text to send, stopped)`` over a stream of text deltas."""

    def __init__(self, stop: Optional[Union[str, Sequence[str]]]):
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self.stopped = False

    def add(self, delta: str, final: bool = False) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self._held = True, ""
            return text[: min(found)], True
        keep = 0 if final else min(self._hold, len(text))
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False
