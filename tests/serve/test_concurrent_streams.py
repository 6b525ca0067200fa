"""Concurrent streaming clients over real HTTP, 10 % of them disconnecting mid-stream: every other
client gets its whole greedy completion (equal to ``LLM.generate``), the disconnected requests are
aborted, no KV block leaks (``/metrics`` and the engine's state), and the server stays up. As the
first HTTP test of the directory it also pays for compiling most of the tiny model's step shapes."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from test_server import metric_values

import jaxserve
from jaxserve.serve.testing import running_server

NEW = 8
PROMPTS = [[10 + i, 20 + i, 30 + i, 40 + i][: 1 + i % 4] for i in range(5)]


@pytest.fixture(scope="module")
def refs(llm):
    return llm.generate(PROMPTS, jaxserve.SamplingParams(NEW, temperature=0.0))


@pytest.fixture(scope="module")
def url(llm, refs):
    with running_server(llm) as base:
        yield base


async def client(http: httpx.AsyncClient, url: str, i: int):
    """Client ``i``: every tenth leaves after two chunks of a long completion; the others read all."""
    leaves = i % 10 == 0
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 200 if leaves else NEW, "temperature": 0,
            "stream": True, "return_token_ids": True, "ignore_eos": leaves}  # fmt: skip
    tokens, finish = [], None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            tokens += choice["token_ids"]
            finish = choice["finish_reason"] or finish
            if leaves and len(tokens) >= 2:
                return "left", tokens
    return finish, tokens


def test_100_streams_with_disconnects_leave_no_blocks_behind(llm, url, refs, num_clients=100):
    before = metric_values(url)

    async def run():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=num_clients + 10)) as http:
            return await asyncio.gather(*[client(http, url, i) for i in range(num_clients)])

    results = asyncio.run(run())
    for i, (finish, tokens) in enumerate(results):
        if i % 10 == 0:
            assert finish == "left" and len(tokens) >= 2
        else:
            ref = refs[i % len(PROMPTS)]
            assert tokens == list(ref.token_ids) and finish == ref.finish_reason, i
    # The ten requests whose clients left are aborted (their 200 tokens never all generated).
    deadline = time.monotonic() + 60
    while True:
        after = metric_values(url)
        aborted = after['jaxserve:request_success_total{finished_reason="abort"}'] - before[
            'jaxserve:request_success_total{finished_reason="abort"}']  # fmt: skip
        if aborted >= num_clients // 10 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert aborted == num_clients // 10
    finished = sum(after[f'jaxserve:request_success_total{{finished_reason="{r}"}}'] - before[
        f'jaxserve:request_success_total{{finished_reason="{r}"}}'] for r in ("stop", "length"))  # fmt: skip
    assert finished == num_clients - num_clients // 10
    # No block leaks: from /metrics and from the engine's own state.
    assert after["jaxserve:kv_cache_blocks_used"] == 0 and after["jaxserve:kv_cache_usage_perc"] == 0
    assert after["jaxserve:num_requests_running"] == 0 and after["jaxserve:num_requests_waiting"] == 0
    loop = url.app.state.serving.loop
    assert loop.snapshot.num_unfinished == 0 and not loop.replica.state.has_unfinished
    pool = loop.replica.state.kv.device
    assert pool.num_used == 0 and pool.num_free == llm.kv.num_blocks
    # The server is still up and serving.
    assert httpx.get(url + "/health").status_code == 200
    out = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0,
                                                     "return_token_ids": True}, timeout=60).json()  # fmt: skip
    assert out["choices"][0]["token_ids"] == list(refs[0].token_ids)
