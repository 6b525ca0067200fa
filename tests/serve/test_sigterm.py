"""``python -m jaxserve.serve`` as a subprocess: SIGTERM stops admitting, lets the in-flight streaming
request finish within ``--grace-s`` and exits 0; past the grace time requests are cut and the
process still exits 0 (eight streams of 250 tokens take far longer than its 0.2 s: about 250 steps
of 8 rows, each several milliseconds even on a fast CPU)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import pytest


def start_server(model_dir, grace_s: float) -> tuple[subprocess.Popen, str]:
    """Starts the server on a free port (``--port 0``) and waits until ``/health`` answers."""
    cache = jax.config.jax_compilation_cache_dir or ""  # the session's: the steps are compiled already
    cmd = [sys.executable, "-m", "jaxserve.serve", "--model", str(model_dir), "--port", "0", "--served-model-name", "tiny",
           "--scheduler", "sarathi", "--scheduler-option", "max_num_seqs=8", "--scheduler-option", "chunk_size=16",
           "--num-blocks", "160", "--block-size", "4", "--grace-s", str(grace_s), "--compile-cache", cache,
           "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 240
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            pytest.fail("the server printed no address")
        if line.startswith("jaxserve: serving"):
            url = line.split(" at ")[-1].strip()
            break
    while httpx.get(url + "/health").status_code != 200:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    return proc, url


def stream_in_thread(url: str, max_tokens: int, prompt=(5, 6, 7)):
    """Starts a streaming completion; returns (queue of its token counts as they come, thread)."""
    progress: queue.Queue = queue.Queue()

    def run():
        tokens, finish = 0, None
        body = {"prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[len("data: "):])
                        if "error" in event:
                            finish = "error"
                            continue
                        tokens += len(event["choices"][0]["token_ids"])
                        finish = event["choices"][0]["finish_reason"] or finish
                        progress.put(tokens)
        except httpx.HTTPError:
            finish = "cut"
        progress.put(("end", tokens, finish))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return progress, thread


def end_of(progress: queue.Queue):
    while True:
        item = progress.get(timeout=120)
        if isinstance(item, tuple):
            return item


@pytest.mark.parametrize("grace_s", [30.0, 0.2])
def test_sigterm_drains_in_flight_requests_and_exits_0(plain_model_dir, grace_s):
    proc, url = start_server(plain_model_dir, grace_s)
    try:
        new = 150 if grace_s > 5 else 250
        streams = [stream_in_thread(url, new, (5 + i, 6)) for i in range(1 if grace_s > 5 else 8)]
        for progress, _ in streams:
            assert progress.get(timeout=120) >= 1  # the requests are running
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # No new work is admitted (the listening socket is closed, or a 503 on a kept-alive path).
        try:
            r = httpx.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 2}, timeout=10)
            assert r.status_code == 503
        except httpx.TransportError:
            pass
        ends = [end_of(progress) for progress, _ in streams]
        if grace_s > 5:
            assert [(tokens, finish) for _, tokens, finish in ends] == [(new, "length")]  # finished within the grace time
        else:
            assert any(tokens < new for _, tokens, _ in ends)  # cut when the grace time ran out
        assert proc.wait(timeout=120) == 0
        for _, thread in streams:
            thread.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
