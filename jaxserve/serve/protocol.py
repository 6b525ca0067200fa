"""The OpenAI API's request bodies as pydantic models (OpenAI's field names; vLLM's extensions
``top_k``, ``ignore_eos``, ``stop_token_ids``, ``return_token_ids``), and OpenAI-style errors.

Types are strict (no "5" for 5, no true for 1, no NaN): a wrong type is a 400 naming the field,
never a coerced value. Fields the server does not implement are accepted only at their defaults
(``n`` = 1, no ``logprobs``, ...), so a client never gets silently different semantics; unknown
fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr

Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
TokenId = Annotated[int, Strict()]
Prompt = Union[StrictStr, list[TokenId], list[StrictStr], list[list[TokenId]]]


class BadRequest(ValueError):
    """A request the server refuses with 400; ``param`` names the field at fault (OpenAI's key)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.kind = kind


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None, code=None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None  # OpenAI's default: 1
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None  # vLLM's extension; 0 or -1: off
    seed: Optional[StrictInt] = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stop_token_ids: Optional[list[TokenId]] = None  # vLLM's extension
    ignore_eos: StrictBool = False  # vLLM's extension: generate through EOS (fixed output lengths)
    return_token_ids: StrictBool = False  # vLLM's extension (always on without a tokenizer)
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[StrictStr] = None

    def check_supported(self) -> None:
        """Raises ``BadRequest`` for a field set to something the server does not implement."""
        if self.n != 1:
            raise BadRequest("only n=1 is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise BadRequest(f"{name} is not supported (only 0)", name)
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed with stream=true", "stream_options")


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise BadRequest("echo is not supported", "echo")
        if self.logprobs is not None:
            raise BadRequest("logprobs is not supported", "logprobs")
        if self.best_of not in (None, 1):
            raise BadRequest("only best_of=1 is supported", "best_of")
        if self.suffix:
            raise BadRequest("suffix is not supported", "suffix")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... reach the chat template as given

    role: StrictStr
    content: Optional[Union[StrictStr, list[dict[str, Any]]]] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = None  # OpenAI's newer name for max_tokens
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[list[Any]] = None
    add_generation_prompt: StrictBool = True  # vLLM's extension
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vLLM's extension: extra template variables

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise BadRequest("logprobs is not supported", "logprobs")
        if self.tools:
            raise BadRequest("tools are not supported", "tools")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise BadRequest("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")

