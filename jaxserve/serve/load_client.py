"""The load client's HTTP side: replay timed requests against any OpenAI-compatible ``/v1/completions``.

``discover`` asks the server for its model (``/v1/models``) and whether it takes prompts as token-id
lists; ``replay`` sends each ``LoadRequest`` at its arrival time (seconds after the start, real time)
as a streaming completion and records what the client saw: when it sent the request, when each
server-sent-event chunk with tokens arrived and how many tokens it carried, how the stream ended.
Nothing here raises for one request's failure: an HTTP error, a timeout or a broken stream becomes
that request's ``Outcome`` (``status`` "rejected" for a 4xx refusal, "failed" otherwise).
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Optional, Union

import httpx
import numpy as np

Prompt = Union[list[int], str]

#: Words that tokenizers of the Llama / GPT families encode as one token each after a space, so a
#: synthetic text prompt of n words is about n tokens (the server's usage reports the exact count).
_WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
          "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they",
          "you", "were", "their", "one", "all", "we", "can", "her", "has", "there", "been")  # fmt: skip
FALLBACK_VOCAB = 256  # ids drawn below this when the server does not say its vocabulary size


class EndpointError(RuntimeError):
    """The server cannot be used at all (unreachable, no model, refuses the probe request); the
    message names the command-line flag to look at."""


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """One request to send: ``arrival_s`` seconds after the run starts (already time-scaled), a prompt
    of ``prompt_len`` tokens, at most ``max_tokens`` generated; ``prefix_hashes`` (Mooncake block ids,
    ``hash_block_size`` tokens each) make prompts that share leading hashes share their token ids."""

    request_id: str
    arrival_s: float
    prompt_len: int
    max_tokens: int
    client_id: str = "default"
    prefix_hashes: Optional[tuple[int, ...]] = None
    hash_block_size: int = 512


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the client saw of one request; times in seconds after the run started.

    ``chunk_s[k]`` is when the k-th stream chunk with tokens arrived and ``chunk_tokens[k]`` how many
    it carried (its ``token_ids`` when the server sends them, else 1 per chunk with text). ``end_s``:
    the stream ended normally (None otherwise). ``status``: "ok" | "rejected" (4xx) | "failed"
    (5xx, timeout, connection or stream error), ``error`` says what. ``finish_reason`` is the server's
    ("length" | "stop" | ...). ``usage_tokens``: ``usage.completion_tokens`` when reported."""

    request_id: str
    sent_s: float
    chunk_s: tuple[float, ...] = ()
    chunk_tokens: tuple[int, ...] = ()
    end_s: Optional[float] = None
    status: str = "ok"
    error: str = ""
    finish_reason: str = ""
    usage_tokens: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        return int(sum(self.chunk_tokens))


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What ``discover`` learnt: the model name to send, the prompt form it takes ("ids" | "text"),
    and what ``/v1/models`` reports of its limits (None when it does not say)."""

    base_url: str
    model: str
    prompt_mode: str
    max_model_len: Optional[int] = None
    vocab_size: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class SendOptions:
    """The request body's settings beyond prompt and length, and the client's limits.

    ``ignore_eos`` asks servers that know the field (vLLM, jaxserve) to generate exactly
    ``max_tokens``; ``extra_body`` is merged into every body last. ``timeout_s``: one request's whole
    life; ``max_concurrency``: requests in flight at once (None: unbounded, so that arrivals are
    never held back by the client)."""

    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: dict = dataclasses.field(default_factory=dict)
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_concurrency: Optional[int] = None


# -- prompts ----------------------------------------------------------------------------------------


def prompt_ids(request: LoadRequest, vocab_size: int, seed: int) -> list[int]:
    """Token ids in ``[0, vocab_size)``, ``prompt_len`` of them, reproducible from ``seed`` and the
    request id; a prompt with prefix hashes takes block ``i``'s ids from its hash alone, so that
    requests with equal leading hashes have equal leading ids (prefix-cache hits as in the trace)."""
    rng = np.random.default_rng([seed, *request.request_id.encode()])
    ids = rng.integers(0, vocab_size, size=request.prompt_len)
    for i, h in enumerate(request.prefix_hashes or ()):
        start = i * request.hash_block_size
        if start >= request.prompt_len:
            break
        block = np.random.default_rng([seed, h & 0xFFFFFFFF, (h >> 32) & 0xFFFFFFFF, 1 if h < 0 else 0])
        ids[start : start + request.hash_block_size] = block.integers(0, vocab_size, size=request.hash_block_size)[
            : request.prompt_len - start
        ]
    return ids.tolist()


def prompt_text(request: LoadRequest, seed: int) -> str:
    """About ``prompt_len`` tokens of text: that many common words, drawn reproducibly per request."""
    rng = np.random.default_rng([seed, *request.request_id.encode()])
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=request.prompt_len))


def make_prompt(request: LoadRequest, info: ServerInfo, seed: int) -> Prompt:
    if info.prompt_mode == "ids":
        return prompt_ids(request, info.vocab_size or FALLBACK_VOCAB, seed)
    return prompt_text(request, seed)


def request_body(model: str, prompt: Prompt, max_tokens: int, options: SendOptions, stream: bool = True) -> dict:
    """A ``/v1/completions`` body: streaming with usage in the last chunk, token ids asked for."""
    body = {"model": model, "prompt": prompt, "max_tokens": int(max_tokens), "temperature": options.temperature,
            "stream": stream, "return_token_ids": True}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    if options.ignore_eos:
        body["ignore_eos"] = True
    body.update(options.extra_body)
    return body


# -- discovery --------------------------------------------------------------------------------------


def _error_text(response: httpx.Response) -> str:
    """The server's error message (OpenAI-style ``{"error": {"message": ...}}``, else the body)."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:300]
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:300]
    return str(err)[:300]


def _int_field(entry: dict, *names: str) -> Optional[int]:
    for name in names:
        value = entry.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


async def discover(
    client: httpx.AsyncClient, base_url: str, model: Optional[str], prompt_mode: str, options: SendOptions,
    vocab_size: Optional[int] = None,
) -> ServerInfo:
    """The server's model (``model``, else the first ``/v1/models`` lists) and prompt form.

    ``prompt_mode`` "auto" sends one 1-token probe with a token-id prompt and takes "ids" when it
    succeeds, else probes with text; "ids" / "text" probe that form only. Raises ``EndpointError``
    (naming ``--base-url``, ``--model`` or the body options) when nothing works."""
    try:
        response = await client.get(f"{base_url}/v1/models")
    except httpx.HTTPError as e:
        raise EndpointError(f"--base-url {base_url}: cannot reach the server ({type(e).__name__}: {e})") from None
    if response.status_code != 200:
        raise EndpointError(f"--base-url {base_url}: GET /v1/models answered {response.status_code}: {_error_text(response)}")
    try:
        entries = [e for e in response.json().get("data", []) if isinstance(e, dict) and isinstance(e.get("id"), str)]
    except (ValueError, AttributeError):
        entries = []
    names = [e["id"] for e in entries]
    if model is None:
        if not names:
            raise EndpointError(f"--base-url {base_url}: /v1/models lists no model; name one with --model")
        model = names[0]
    entry = entries[names.index(model)] if model in names else {}
    info = ServerInfo(base_url, model, "ids", _int_field(entry, "max_model_len", "context_length", "context_window"),
                      vocab_size or _int_field(entry, "vocab_size"))  # fmt: skip
    probe = LoadRequest("probe", 0.0, prompt_len=4, max_tokens=1)
    modes = ("ids", "text") if prompt_mode == "auto" else (prompt_mode,)
    refusals = []
    for mode in modes:
        info = dataclasses.replace(info, prompt_mode=mode)
        body = request_body(model, make_prompt(probe, info, 0), 1, options, stream=False)
        try:
            answer = await client.post(f"{base_url}/v1/completions", json=body, timeout=options.timeout_s)
        except httpx.HTTPError as e:
            raise EndpointError(f"--base-url {base_url}: POST /v1/completions failed ({type(e).__name__}: {e})") from None
        if answer.status_code == 200:
            return info
        refusals.append(f"{mode} prompt: {answer.status_code} {_error_text(answer)}")
    hint = "--model" if model not in names else "--prompt-mode / --no-ignore-eos / --extra-body"
    raise EndpointError(f"--base-url {base_url}: the server refused the probe completion ({'; '.join(refusals)}); check {hint}")


_CACHE_INFO = re.compile(r"^[A-Za-z_]\w*:cache_config_info\{([^}]*)\}", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


async def server_kv_pool(client: httpx.AsyncClient, base_url: str) -> Optional[tuple[int, int]]:
    """(KV blocks, tokens per block) from the server's Prometheus ``<prefix>:cache_config_info``
    gauge's ``num_gpu_blocks`` / ``block_size`` labels (vLLM's; jaxserve's under its prefix), or None
    when ``/metrics`` does not say."""
    try:
        response = await client.get(f"{base_url}/metrics")
    except httpx.HTTPError:
        return None
    match = _CACHE_INFO.search(response.text) if response.status_code == 200 else None
    labels = dict(_LABEL.findall(match.group(1))) if match else {}
    try:
        return int(labels["num_gpu_blocks"]), int(labels["block_size"])
    except (KeyError, ValueError):
        return None


# -- one streamed request ---------------------------------------------------------------------------


def _chunk_tokens(choice: dict) -> int:
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    return 1 if choice.get("text") else 0


async def _lines(response: httpx.Response):
    """The body's lines as bytes (``\n``, ``\r\n`` or ``\r`` ends one, as in SSE): split per
    received piece, cheaper per event than ``aiter_lines``' text decoding (JSON is UTF-8 bytes)."""
    rest = b""
    async for data in response.aiter_bytes():
        lines = (rest + data).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line
    if rest:
        yield rest


async def _stream(client, url: str, body: dict, clock: Callable[[], float], sent: float, request_id: str) -> Outcome:
    times: list[float] = []
    counts: list[int] = []
    finish, usage = "", None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            code = response.status_code
            status = "rejected" if 400 <= code < 500 else "failed"
            try:
                phrase = http.HTTPStatus(code).phrase
            except ValueError:
                phrase = f"status {code}"
            return Outcome(request_id, sent, status=status, error=f"HTTP {phrase}: {_error_text(response)}")
        async for line in _lines(response):
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = clock()
            event = json.loads(data)
            if "error" in event and not event.get("choices"):
                err = event["error"]
                message = err.get("message", err) if isinstance(err, dict) else err
                return Outcome(request_id, sent, tuple(times), tuple(counts), status="failed",
                               error=f"stream error: {message}", finish_reason=finish)  # fmt: skip
            for choice in event.get("choices") or ():
                n = _chunk_tokens(choice)
                if n:
                    times.append(now)
                    counts.append(n)
                finish = choice.get("finish_reason") or finish
            if isinstance(event.get("usage"), dict):
                usage = event["usage"].get("completion_tokens", usage)
    if not finish and not times:
        return Outcome(request_id, sent, status="failed", error="the stream ended without a token")
    return Outcome(request_id, sent, tuple(times), tuple(counts), clock(), "ok", "", finish or "unknown", usage)


async def send_one(client, url: str, body: dict, clock: Callable[[], float], request_id: str, timeout_s: float) -> Outcome:
    """Streams one completion; never raises (but for cancellation): errors become the Outcome."""
    sent = clock()
    try:
        async with asyncio.timeout(timeout_s):
            return await _stream(client, url, body, clock, sent, request_id)
    except TimeoutError:
        return Outcome(request_id, sent, status="failed", error=f"timed out after {timeout_s:g} s (--timeout)")
    except httpx.HTTPError as e:
        return Outcome(request_id, sent, status="failed", error=f"{type(e).__name__}: {e}".rstrip(": "))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a malformed chunk
        return Outcome(request_id, sent, status="failed", error=f"malformed stream: {type(e).__name__}: {e}")


# -- the replay -------------------------------------------------------------------------------------


def make_client(options: SendOptions) -> httpx.AsyncClient:
    """An async client with no pool limit below ``max_concurrency`` (httpx's default of 100
    connections would queue arrivals inside the client and add to their TTFT)."""
    limits = httpx.Limits(max_connections=options.max_concurrency, max_keepalive_connections=64)
    timeout = httpx.Timeout(options.timeout_s, connect=options.connect_timeout_s)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


async def replay(
    client: httpx.AsyncClient,
    info: ServerInfo,
    requests: Sequence[LoadRequest],
    options: SendOptions,
    *,
    seed: int = 0,
    on_done: Optional[Callable[[Outcome], None]] = None,
) -> list[Outcome]:
    """Sends every request at its ``arrival_s`` after now (a late loop sends at once) and waits for
    all; outcomes in ``requests``' order. ``on_done`` sees each outcome as it completes."""
    url = f"{info.base_url}/v1/completions"
    bodies = [request_body(info.model, make_prompt(r, info, seed), r.max_tokens, options) for r in requests]
    gate = asyncio.Semaphore(options.max_concurrency) if options.max_concurrency else None
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    async def one(request: LoadRequest, body: dict) -> Outcome:
        if gate is None:
            outcome = await send_one(client, url, body, clock, request.request_id, options.timeout_s)
        else:
            async with gate:
                outcome = await send_one(client, url, body, clock, request.request_id, options.timeout_s)
        if on_done is not None:
            on_done(outcome)
        return outcome

    tasks = []
    for request, body in zip(requests, bodies):
        delay = request.arrival_s - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request, body)))
    return list(await asyncio.gather(*tasks))
