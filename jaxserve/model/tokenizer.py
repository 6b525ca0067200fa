"""Text <-> token ids through a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library)."""

from __future__ import annotations

import os

from jaxserve.model.config import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """``encode(text) -> list[int]`` and ``decode(ids) -> str`` of a model directory's tokenizer."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer  # imported lazily: only text prompts need it

        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
        self.path = path

    @classmethod
    def from_dir(cls, model_dir: str) -> Tokenizer | None:
        """The directory's tokenizer, or None when it has no ``tokenizer.json``."""
        path = os.path.join(model_dir, TOKENIZER_FILE)
        return cls(path) if os.path.isfile(path) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
