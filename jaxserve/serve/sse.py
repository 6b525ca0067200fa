"""Server-sent events of one streaming completion, encoded without building a dict per chunk.

Every chunk of a response shares its ``id``, ``object``, ``created`` and ``model``; ``ChunkEncoder``
renders that head once and writes a token chunk (``delta``: the hot path, one per request per
engine step) by filling in the index, the text (``json``'s C string encoder) and the token ids.
Any other chunk (the role chunk, a first chunk with the prompt's ids, a finish chunk, usage, an
error) goes through ``json.dumps``. Both give the same JSON objects, compact (no spaces), as
``json.dumps(chunk, separators=(",", ":"))``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii
from typing import Optional

_COMPACT = (",", ":")


class ChunkEncoder:
    """``data: <chunk>\\n\\n`` strings of one response: ``chat`` chunks (``chat.completion.chunk``,
    text in ``delta.content``) or completion chunks (``text_completion``, text in ``text``); with
    ``include_usage`` every chunk has ``usage`` (null but in the last); with ``with_ids`` token chunks
    carry ``token_ids``."""

    def __init__(self, response_id: str, model: str, created: int, chat: bool, include_usage: bool, with_ids: bool):
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self.head = {"id": response_id, "object": self.kind, "created": created, "model": model}
        self.chat, self.include_usage, self.with_ids = chat, include_usage, with_ids
        rendered = json.dumps(self.head, separators=_COMPACT)
        self._open = f'data: {rendered[:-1]},"choices":[{{"index":'
        self._text_key = ',"delta":{"content":' if chat else ',"text":'
        self._after_text = '},"logprobs":null,"finish_reason":null' if chat else ',"logprobs":null,"finish_reason":null'
        self._close = '}],"usage":null}\n\n' if include_usage else "}]}\n\n"

    def delta(self, index: int, text: str, token_ids: Optional[Sequence[int]]) -> str:
        """A chunk of new text (and, with ``with_ids``, ``token_ids``) of choice ``index``, not its last."""
        ids = f',"token_ids":[{",".join(map(str, token_ids))}]' if self.with_ids else ""
        return f"{self._open}{index}{self._text_key}{encode_basestring_ascii(text)}{self._after_text}{ids}{self._close}"

    def chunk(self, choice: Optional[dict], usage: Optional[dict] = None) -> str:
        """A chunk of one ``choice`` (None: no choice, e.g. the usage chunk)."""
        data = dict(self.head, choices=[choice] if choice is not None else [])
        if self.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data, separators=_COMPACT)}\n\n"

    @staticmethod
    def error(body: dict) -> str:
        """An error event (OpenAI's error object)."""
        return f"data: {json.dumps(body, separators=_COMPACT)}\n\n"


DONE = "data: [DONE]\n\n"
