"""Chat templates: a model directory's Jinja chat template (``chat_template.jinja``, or
``chat_template`` in ``tokenizer_config.json``) rendered the way ``transformers``'
``apply_chat_template`` renders it (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``, the
``raise_exception`` and ``strftime_now`` helpers, ``bos_token``/``eos_token`` from the config)."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Optional

TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.47 saves the template here
CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or rejected them)."""


class ChatTemplate:
    """``render(messages, add_generation_prompt) -> str`` of one template source."""

    def __init__(self, source: str, special_tokens: Optional[dict[str, str]] = None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # only chat requests need jinja2

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii
        )
        self._template = env.from_string(source)
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(cls, model_dir: str) -> Optional["ChatTemplate"]:
        """The directory's template, or None when it has none."""
        config = _read_json(os.path.join(model_dir, CONFIG_FILE))
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        special = {k: v for k, v in special.items() if v is not None}
        path = os.path.join(model_dir, TEMPLATE_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return cls(f.read(), special)
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        return cls(source, special) if isinstance(source, str) and source else None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens, **extra
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template cannot render these messages: {e}") from None


def _raise(message: str):
    raise ChatTemplateError(message)


def _token_text(value) -> Optional[str]:
    """A special token as the config gives it: a string, or ``{"content": ...}`` (older configs)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}
