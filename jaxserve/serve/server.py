"""The OpenAI-compatible HTTP server (FastAPI): ``build_app(llm)`` serves a ``jaxserve.LLM``'s model,
scheduler and KV cache through a real-time ``EngineLoop``.

Routes: ``POST /v1/completions`` and ``/v1/chat/completions`` (server-sent events with
``stream: true``), ``GET /v1/models``, ``/health`` and ``/metrics`` (Prometheus, ``serve.metrics``).
Prompts are text or token ids; ``return_token_ids`` adds the prompt's and the output's token ids to
the response (always on when the model directory has no tokenizer, whose text is then empty).
Errors are OpenAI's error object: 400 for a bad request naming the field (also for malformed JSON
and wrong types: FastAPI's 422 is overridden), 404 for an unknown model or route, 429 when more
than ``max_queue`` requests wait, 503 while shutting down. A client that disconnects aborts its
requests, which frees their KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxserve.request import Request, SamplingParams
from jaxserve.serve.chat import ChatTemplate, ChatTemplateError
from jaxserve.serve.detokenize import Detokenizer, StopStrings
from jaxserve.serve.engine_loop import Draining, EngineLoop, QueueFull, RequestOutput
from jaxserve.serve.handoff import Handoff, Mailbox, merge
from jaxserve.serve.metrics import ServerMetrics
from jaxserve.serve.protocol import BadRequest, ChatCompletionRequest, CompletionRequest, error_body
from jaxserve.serve.sse import DONE, ChunkEncoder

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's (and vLLM's) max_tokens default for /v1/completions
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (vLLM's _SAMPLING_EPS)
# SamplingParams' field names in its errors -> the request's field names.
_SAMPLING_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                    "seed": "seed", "stop_token_ids": "stop_token_ids"}  # fmt: skip


class Serving:
    """What the routes share: the model's limits and tokenizer, the loop, the metrics."""

    def __init__(self, llm, loop: EngineLoop, model_name: str):
        self.llm = llm
        self.loop = loop
        self.model_name = model_name
        self.tokenizer = llm.tokenizer
        self.chat_template = ChatTemplate.from_dir(llm.model_dir)
        self.vocab_size = llm.cfg.vocab_size
        self.max_model_len = llm.max_model_len
        self.eos_token_ids = tuple(llm.cfg.eos_token_ids) if llm.stop_at_eos else ()
        self.scheduler = llm.scheduler
        self.kv_tokens = llm.kv.num_blocks * llm.kv.block_size
        self._empty_state = llm.scheduler.init(llm.kv)  # for the scheduler's admission check (pure)
        self.created = int(time.time())
        self._handoff: Optional[Handoff] = None  # engine threads -> the event loop it was made on
        self._handoff_loop = None

    # -- request -> engine requests ------------------------------------------------------------------
    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest(f"model {self.model_name!r} has no tokenizer.json: pass the prompt as token ids", param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def prompts_of(self, body: CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            items = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise BadRequest("prompt is empty", "prompt")
        return [self.encode(p, "prompt") if isinstance(p, str) else list(p) for p in items]

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if not body.messages:
            raise BadRequest("messages is empty", "messages")
        if self.tokenizer is None:
            raise BadRequest(f"model {self.model_name!r} has no tokenizer.json: chat needs one", "messages")
        if self.chat_template is None:
            raise BadRequest(
                f"model {self.model_name!r} has no chat template (chat_template.jinja or tokenizer_config.json's "
                "chat_template): use /v1/completions", "messages",
            )  # fmt: skip
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = self.chat_template.render(messages, body.add_generation_prompt, **(body.chat_template_kwargs or {}))
        except ChatTemplateError as e:
            raise BadRequest(str(e), "messages") from None
        # The template writes the special tokens itself (as transformers' apply_chat_template).
        return self.encode(text, "messages", add_special_tokens=False)

    def requests(self, body, prompts: Sequence[list[int]], prefix: str, prompt_param: str, default_max: Optional[int]):
        """One engine Request per prompt, each checked as the engine would check it (400 naming the
        field otherwise)."""
        body.check_supported()
        if body.model is not None and body.model != self.model_name:
            raise BadRequest(f"The model `{body.model}` does not exist.", "model", 404, "NotFoundError")
        max_tokens, max_param = body.max_tokens, "max_tokens"
        if getattr(body, "max_completion_tokens", None) is not None:
            max_tokens, max_param = body.max_completion_tokens, "max_completion_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise BadRequest(f"{max_param} must be at least 1, got {max_tokens}", max_param)
        if body.stop is not None and self.tokenizer is None:
            raise BadRequest("stop strings need a tokenizer; use stop_token_ids", "stop")
        base = uuid.uuid4().hex
        out = []
        for i, ids in enumerate(prompts):
            if not ids:
                raise BadRequest(f"{prompt_param} is empty", prompt_param)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise BadRequest(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", prompt_param)
            n = len(ids)
            if n >= self.max_model_len:
                raise BadRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {n}",
                    prompt_param,
                )  # fmt: skip
            # Without max_tokens: the endpoint's default, else all the room the context and the cache leave.
            new = max_tokens if max_tokens is not None else (default_max or min(self.max_model_len, self.kv_tokens) - n)
            if n + new > self.max_model_len:
                raise BadRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{n + new} tokens ({n} in the prompt, {new} for the completion).", max_param,
                )  # fmt: skip
            # OpenAI's ``user`` names the client: fair schedulers (vtc) and routers share service by it.
            request = Request(f"{prefix}-{base}-{i}", prompt_token_ids=ids, sampling=self.sampling(body, new),
                              client_id=body.user or "default")  # fmt: skip
            try:  # the scheduler's own admission rules (KV capacity, step budget): pure, on an empty state
                self.scheduler.add_request(self._empty_state, request, 0.0)
            except ValueError as e:
                raise BadRequest(str(e), prompt_param) from None
            out.append(request)
        return out

    def sampling(self, body, max_new_tokens: int) -> SamplingParams:
        temperature = 1.0 if body.temperature is None else body.temperature
        top_k = body.top_k or 0
        if top_k < -1:
            raise BadRequest(f"top_k must be -1 (off) or >= 0, got {top_k}", "top_k")
        stops = tuple(body.stop_token_ids or ()) + (() if body.ignore_eos else self.eos_token_ids)
        bad = next((t for t in stops if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"stop token id {bad} is outside the vocabulary [0, {self.vocab_size})", "stop_token_ids")
        try:
            return SamplingParams(
                max_new_tokens,
                temperature=0.0 if 0 <= temperature < GREEDY_BELOW else temperature,
                top_k=0 if top_k < 0 or top_k >= self.vocab_size else top_k,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed,
                stop_token_ids=tuple(dict.fromkeys(stops)),
            )  # fmt: skip
        except ValueError as e:
            message = str(e)
            field = next((f for f in _SAMPLING_FIELDS if f"SamplingParams.{f}" in message), None)
            raise BadRequest(message.replace("SamplingParams.", ""), _SAMPLING_FIELDS.get(field)) from None

    # -- engine outputs -> responses ------------------------------------------------------------------
    async def outputs(self, requests: list[Request], http: HTTPRequest) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """Submits ``requests`` and yields batches of ``(index, output)`` as the loop produces them
        (a request's outputs that piled up while the consumer was busy merged into one), until each
        has ended; the unfinished ones are aborted when the consumer stops early or the client leaves."""
        aio = asyncio.get_running_loop()
        if self._handoff is None or self._handoff_loop is not aio:
            self._handoff, self._handoff_loop = Handoff(aio), aio
        handoff, box = self._handoff, Mailbox()
        live: set[str] = set()
        try:
            for i, r in enumerate(requests):
                self.loop.submit(r, lambda out, i=i: handoff.post(box, (i, out)))
                live.add(r.request_id)
            watcher = asyncio.ensure_future(_disconnected(http))
            watcher.add_done_callback(lambda _: box.close())
            try:
                while live:
                    batch = await box.get()
                    if box.closed:
                        return  # the client left: the finally clause aborts what is live
                    batch = merge(batch)
                    for _, out in batch:
                        if out.finished:
                            live.discard(out.request_id)
                    yield batch
            finally:
                watcher.cancel()
        finally:
            for rid in live:
                self.loop.abort(rid)


async def _disconnected(http: HTTPRequest) -> None:
    """Returns when the client has disconnected (the request body is already read)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


class _Choice:
    """One choice's text and tokens as they stream in."""

    def __init__(self, serving: Serving, request: Request, stop):
        self.request = request
        self.detok = Detokenizer(serving.tokenizer) if serving.tokenizer is not None else None
        self.stops = StopStrings(stop)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None

    def add(self, out: RequestOutput) -> tuple[str, list[int], bool]:
        """Takes an output: ``(new text, new token ids, whether a stop string ended it)``."""
        self.token_ids += out.token_ids
        delta = self.detok.add(out.token_ids, final=out.finished) if self.detok is not None else ""
        delta, stopped = self.stops.add(delta, final=out.finished)
        self.text += delta
        if stopped:
            self.finish_reason = "stop"
        elif out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error
        return delta, list(out.token_ids), stopped


def _usage(choices: list[_Choice]) -> dict:
    prompt = sum(c.request.prompt_len for c in choices)
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error_response(status: int, message: str, kind: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, status), status_code=status)


def _error_of(c: _Choice) -> Optional[dict]:
    """The OpenAI error object of a choice that did not end normally: 400 when the engine refused
    it (bad input found late), 500 when its step failed, 503 when the server aborted it."""
    if c.finish_reason == "rejected":
        return error_body(c.error, "invalid_request_error", "prompt", 400)
    if c.finish_reason == "error":
        return error_body(c.error, "internal_server_error", None, 500)
    if c.finish_reason == "abort":
        return error_body("the request was aborted (the server is shutting down)", "service_unavailable", None, 503)
    return None


def _failure(choices: list[_Choice]) -> Optional[JSONResponse]:
    """The error response of a request one of whose choices did not end normally, if any."""
    for c in choices:
        error = _error_of(c)
        if error is not None:
            return JSONResponse(error, status_code=error["error"]["code"])
    return None


def build_app(llm, *, model_name: Optional[str] = None, max_queue: Optional[int] = None, grace_s: float = 30.0,
              loop: Optional[EngineLoop] = None) -> FastAPI:  # fmt: skip
    """The FastAPI app serving ``llm`` (a ``jaxserve.LLM``) as ``model_name`` (default: its model
    directory). Its engine loop starts with the app and stops with it, finishing in-flight requests
    for up to ``grace_s`` seconds. ``loop``: a loop to serve with instead of ``llm``'s own (e.g. a
    ``serve.routed.RoutedLoops`` over several engines of the same model; ``llm`` still checks
    requests and decodes text). ``app.state.serving`` holds the loop and the metrics."""
    model_name = model_name or llm.model_dir
    if loop is None:
        loop = EngineLoop.from_llm(llm, max_queue=max_queue)
    metrics = ServerMetrics(model_name, llm.max_model_len, loop)
    loop.observer = metrics
    serving = Serving(llm, loop, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not loop.running:
            loop.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, loop.stop, grace_s)

    app = FastAPI(title="jaxserve", lifespan=lifespan)
    app.state.serving = serving
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error_response(400, f"malformed JSON body: {first.get('msg')}", "invalid_request_error")
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return _error_response(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error", param)

    @app.exception_handler(BadRequest)
    async def _bad(request, exc: BadRequest):
        return _error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(QueueFull)
    async def _full(request, exc: QueueFull):
        return _error_response(429, f"too many requests waiting: {exc}", "rate_limit_exceeded")

    @app.exception_handler(Draining)
    async def _draining(request, exc: Draining):
        return _error_response(503, str(exc), "service_unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # a server bug: still OpenAI's error object
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_server_error")

    @app.get("/health")
    async def health():
        if loop.draining or not loop.running:
            return _error_response(503, "shutting down", "service_unavailable")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": serving.created, "owned_by": "jaxserve",
                "root": llm.model_dir, "max_model_len": llm.max_model_len,
                "vocab_size": llm.cfg.vocab_size}  # fmt: skip  (load clients draw token-id prompts below it)
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        requests = serving.requests(body, serving.prompts_of(body), "cmpl", "prompt", DEFAULT_COMPLETION_TOKENS)
        return await _respond(serving, body, requests, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        requests = serving.requests(body, [serving.chat_prompt(body)], "chatcmpl", "messages", None)
        return await _respond(serving, body, requests, http, chat=True)

    return app


async def _respond(serving: Serving, body, requests: list[Request], http: HTTPRequest, chat: bool):
    choices = [_Choice(serving, r, body.stop) for r in requests]
    response_id = requests[0].request_id.rsplit("-", 1)[0]
    with_ids = body.return_token_ids or serving.tokenizer is None
    if body.stream:
        outputs = serving.outputs(requests, http)  # submits now: QueueFull / Draining become responses
        first = await anext(outputs, None)
        if first is not None and len(choices) == 1:
            out = first[0][1]
            if out.finish_reason in ("rejected", "error") and not out.token_ids:
                choices[0].add(out)  # ended before its first token: an error response, not a stream
                await outputs.aclose()
                return _failure(choices)
        stream = _sse(serving, body, choices, outputs, first, response_id, with_ids, chat)
        return StreamingResponse(stream, media_type="text/event-stream")
    async for batch in serving.outputs(requests, http):
        for i, out in batch:
            if choices[i].finish_reason is None:
                _, _, stopped = choices[i].add(out)
                if stopped:
                    serving.loop.abort(out.request_id, "stop")
    failure = _failure(choices)
    if failure is not None:
        return failure
    result = {"id": response_id, "object": "chat.completion" if chat else "text_completion",
              "created": int(time.time()), "model": serving.model_name, "choices": [], "usage": _usage(choices)}  # fmt: skip
    for i, c in enumerate(choices):
        if chat:
            choice = {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                      "finish_reason": c.finish_reason}  # fmt: skip
        else:
            choice = {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        if with_ids:
            choice["token_ids"] = c.token_ids
            if not chat:
                choice["prompt_token_ids"] = list(c.request.prompt_token_ids)
        result["choices"].append(choice)
    if chat and with_ids:
        result["prompt_token_ids"] = list(requests[0].prompt_token_ids)
    return JSONResponse(result)


async def _sse(serving: Serving, body, choices, outputs, first, response_id: str, with_ids: bool, chat: bool):
    """The server-sent events of a streaming response: a chunk per output with new text or tokens
    (a token chunk per engine step while the client keeps up, several steps' tokens in one when it
    lags), a last chunk per choice with its finish reason, usage when asked, then ``[DONE]``; an
    error event when a choice ends with an error. The events of one batch go out in one write."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    encoder = ChunkEncoder(response_id, serving.model_name, int(time.time()), chat, include_usage, with_ids)
    try:
        if chat:
            yield encoder.chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})  # fmt: skip
        batch = first
        while batch is not None:
            events = [_event(serving, encoder, choices, i, out) for i, out in batch]
            text = "".join(events)
            if text:
                yield text
            batch = await anext(outputs, None)
        if include_usage:
            yield encoder.chunk(None, _usage(choices))
        yield DONE
    finally:
        await outputs.aclose()  # aborts whatever is still live (the client left)


def _event(serving: Serving, encoder: ChunkEncoder, choices: list[_Choice], i: int, out: RequestOutput) -> str:
    """The event (or "") that output ``out`` of choice ``i`` makes."""
    c = choices[i]
    if c.finish_reason is not None:  # a stop string already ended it
        return ""
    delta, ids, stopped = c.add(out)
    if stopped:
        serving.loop.abort(out.request_id, "stop")
    error = _error_of(c)
    if error is not None:
        return encoder.error(error)
    first_chunk = encoder.with_ids and not encoder.chat and len(c.token_ids) == len(ids)  # carries the prompt's ids
    if c.finish_reason is None and not first_chunk:
        return encoder.delta(i, delta, ids) if delta or ids else ""
    if not (delta or ids or c.finish_reason is not None):
        return ""
    if encoder.chat:
        choice = {"index": i, "delta": {"content": delta} if delta or c.finish_reason is None else {},
                  "logprobs": None, "finish_reason": c.finish_reason}  # fmt: skip
    else:
        choice = {"index": i, "text": delta, "logprobs": None, "finish_reason": c.finish_reason}
    if encoder.with_ids:
        choice["token_ids"] = ids
        if first_chunk:
            choice["prompt_token_ids"] = list(c.request.prompt_token_ids)
    return encoder.chunk(choice)
