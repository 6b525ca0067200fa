"""The load client (jaxserve.bench_serving): stream parsing with exact (fake-clock) timings, the
event log it builds, failures counted, bad flags, and whole runs over real HTTP against a minimal
OpenAI-compatible streaming app written here (so the client is also shown to work with a server
other than jaxserve's), with --compare-sim."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from jaxserve import bench_serving
from jaxserve.metrics import request_metrics
from jaxserve.serve import compare_sim, load_client, load_log, load_workload
from jaxserve.serve.load_client import LoadRequest, Outcome, SendOptions

# -- a minimal OpenAI-compatible streaming server ------------------------------------------------------

FIRST_TOKEN_S = 0.05  # the fake server waits this long before the first token, and
TOKEN_GAP_S = 0.01  # this long before each later one
REFUSE_TOKENS, BREAK_TOKENS, HANG_TOKENS = 7, 11, 9  # max_tokens that make it refuse (429), break the stream, hang
KV_BLOCKS, KV_BLOCK_SIZE = 512, 16


def fake_app(text_only: bool = False):
    """A FastAPI app with /v1/models, streaming /v1/completions and /metrics; ``text_only``: it
    refuses token-id prompts, as a server without that extension does."""
    app = FastAPI()
    app.state.bodies = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "max_model_len": 4096}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(f'fake:cache_config_info{{block_size="{KV_BLOCK_SIZE}",num_gpu_blocks="{KV_BLOCKS}"}} 1.0\n')

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        n = body["max_tokens"]
        if text_only and not isinstance(body["prompt"], str):
            return JSONResponse({"error": {"message": "prompt must be a string", "param": "prompt"}}, status_code=400)
        if n == REFUSE_TOKENS:
            return JSONResponse({"error": {"message": "the queue is full"}}, status_code=429)
        if not body.get("stream"):
            return {"choices": [{"text": "x", "finish_reason": "length"}], "usage": {"completion_tokens": 1}}

        async def events():
            if n == HANG_TOKENS:
                await asyncio.sleep(30)
            await asyncio.sleep(FIRST_TOKEN_S)
            for i in range(n):
                if i:
                    await asyncio.sleep(TOKEN_GAP_S)
                if n == BREAK_TOKENS and i == 2:
                    raise RuntimeError("the fake server breaks the stream")
                last = i == n - 1
                choice = {"index": 0, "text": f" t{i}", "token_ids": [i], "finish_reason": "length" if last else None}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': n}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@contextlib.contextmanager
def serving(app):
    """``app`` served by uvicorn on a free 127.0.0.1 port in a background thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.01)
            assert thread.is_alive(), "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def fake_server():
    app = fake_app()
    with serving(app) as url:
        yield url, app


# -- stream parsing with a fake clock -------------------------------------------------------------------


def sse(*events) -> list[bytes]:
    return [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events]


def stream_outcome(chunks: list[tuple[float, bytes]], status: int = 200, timeout_s: float = 5.0) -> Outcome:
    """``send_one`` over an in-memory transport that yields ``chunks`` (time, bytes); the clock reads
    the time of the last chunk yielded, so timings are exact."""
    now = [0.0]

    async def body():
        for t, data in chunks:
            now[0] = t
            yield data

    async def handler(request):
        return httpx.Response(status, content=body() if status == 200 else b'{"error": {"message": "no"}}')

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await load_client.send_one(client, "http://x/v1/completions", {}, lambda: now[0], "r", timeout_s)

    return asyncio.run(go())


def choice(text="a", ids=None, finish=None) -> dict:
    c = {"text": text, "finish_reason": finish}
    if ids is not None:
        c["token_ids"] = ids
    return {"choices": [c]}


def test_stream_timings_and_token_counts_are_exact():
    chunks = [(0.5, *sse(choice(ids=[5]))), (0.75, *sse(choice(ids=[6, 7]))), (1.0, *sse(choice(text="", finish="length"))),
              (1.0, *sse({"choices": [], "usage": {"completion_tokens": 3}})), (1.25, *sse("[DONE]"))]  # fmt: skip
    o = stream_outcome(chunks)
    assert (o.status, o.finish_reason, o.usage_tokens) == ("ok", "length", 3)
    assert o.chunk_s == (0.5, 0.75) and o.chunk_tokens == (1, 2) and o.num_tokens == 3 and o.end_s == 1.25


def test_text_chunks_without_ids_count_one_token_each():
    o = stream_outcome([(0.1, *sse(choice("x"))), (0.2, *sse(choice("y", finish="stop"))), (0.3, *sse("[DONE]"))])
    assert o.chunk_tokens == (1, 1) and o.finish_reason == "stop"


@pytest.mark.parametrize(
    "chunks, status, expect",
    [
        ([], 429, ("rejected", "HTTP Too Many Requests: no")),
        ([], 503, ("failed", "HTTP Service Unavailable: no")),
        ([(0.1, b"data: {not json\n\n")], 200, ("failed", "malformed stream")),
        ([(0.1, *sse({"error": {"message": "engine died"}}))], 200, ("failed", "stream error: engine died")),
        ([(0.1, *sse("[DONE]"))], 200, ("failed", "the stream ended without a token")),
    ],
)
def test_failures_become_outcomes(chunks, status, expect):
    o = stream_outcome(chunks, status)
    assert o.status == expect[0] and o.error.startswith(expect[1]) and o.end_s is None


# -- the event log ------------------------------------------------------------------------------------------


def test_outcome_log_gives_the_simulators_metrics_exactly():
    reqs = [LoadRequest("a", 0.0, 10, 3), LoadRequest("b", 0.5, 20, 4), LoadRequest("c", 0.6, 5, 4), LoadRequest("d", 0.7, 5, 4)]
    outs = [
        Outcome("a", 0.0, (0.25, 0.5, 1.0), (1, 1, 1), 1.0, finish_reason="length"),
        Outcome("b", 0.5, (1.0, 1.5), (2, 2), 1.75, finish_reason="length"),
        Outcome("c", 0.625, status="rejected", error="HTTP Too Many Requests: full"),
        Outcome("d", 0.75, (1.25,), (1,), status="failed", error="timed out"),
    ]  # fmt: skip
    log = load_log.outcome_log(reqs, outs)
    rm = request_metrics(log)
    np.testing.assert_allclose(rm.ttft_s, [0.25, 0.5, np.nan, 0.5])
    np.testing.assert_allclose(rm.e2e_s, [1.0, 1.25, np.nan, np.nan])
    np.testing.assert_array_equal(rm.num_output, [3, 4, 0, 1])
    # a's gaps 0.25, 0.5; b's chunks of 2 tokens: 0 within each chunk, 0.5 between them
    assert sorted(rm.tbt_s.tolist()) == [0.0, 0.0, 0.25, 0.5, 0.5]
    assert rm.finish_reason == ("length", "length", "rejected: HTTP Too Many Requests: full", "failed: timed out")
    np.testing.assert_array_equal(log.rejected, [False, False, True, False])
    np.testing.assert_array_equal(log.failed, [False, False, False, True])
    m = load_log.summarize_client(log)
    assert (m["num_requests"], m["num_finished"], m["num_rejected"], m["num_failed"]) == (4, 2, 1, 1)
    assert m["makespan_s"] == 1.75 and m["throughput_tok_s"] == pytest.approx(7 / 1.75)
    assert m["num_steps"] is None and m["queueing_s"]["p50"] is None and "client" in m["unavailable"]["queueing_s"]
    # the client's queue view at each chunk (times 0.25, 0.5, 1.0, 1.0, 1.25, 1.5): waiting = sent, no
    # token yet (b at 0.5, d from 0.75 to 1.25; c was refused at once); running = a token, not ended
    np.testing.assert_array_equal(log.step_waiting, [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(log.step_running, [1, 1, 1, 1, 1, 1])


def test_metrics_keys_equal_the_simulators(tmp_path):
    from jaxserve.sim.simulate import build_sim, run_sim

    config = bench_serving._load_config_file(str(bench_serving.DEFAULT_CONFIG))
    config.sim.cost_model, config.sim.profile = "profiled", str(write_profile(tmp_path / "p.json"))
    config.kv.num_blocks = 256
    reqs = [LoadRequest("a", 0.0, 10, 3)]
    outs = [Outcome("a", 0.0, (0.25, 0.5, 1.0), (1, 1, 1), 1.0, finish_reason="length")]
    sim = run_sim(build_sim(config, requests=compare_sim.sim_requests(reqs, outs))).metrics
    assert set(load_log.summarize_client(load_log.outcome_log(reqs, outs))) == set(sim)


def test_compare_rows_and_their_gaps():
    live = {"ttft_s": {"mean": 0.5, "p50": 0.4, "p99": 1.0}, "tbt_s": {"mean": None, "p50": None, "p99": None},
            "e2e_s": {"mean": 2.0, "p50": 0.0, "p99": 3.0}, "throughput_req_s": 4.0, "throughput_tok_s": None}
    sim = {"ttft_s": {"mean": 0.6, "p50": 0.3, "p99": 1.0}, "tbt_s": {"mean": 0.1, "p50": 0.1, "p99": 0.2},
           "e2e_s": {"mean": 1.0, "p50": 1.0, "p99": 3.3}, "throughput_req_s": 5.0, "throughput_tok_s": 9.0}  # fmt: skip
    rows = {r["metric"]: r for r in compare_sim.compare(live, sim)}
    assert rows["ttft_s.mean"]["error"] == pytest.approx(0.2) and rows["ttft_s.p50"]["error"] == pytest.approx(-0.25)
    assert rows["throughput_req_s"] == {"metric": "throughput_req_s", "live": 4.0, "sim": 5.0, "error": 0.25}
    # no live value, or a live 0: no error
    assert rows["tbt_s.p50"]["error"] is None and rows["e2e_s.p50"]["error"] is None and rows["throughput_tok_s"]["error"] is None
    assert compare_sim.worst_error(list(rows.values())) == pytest.approx(0.5)  # e2e mean: 1.0 / 2.0 - 1


# -- prompts and workloads ------------------------------------------------------------------------------------


def test_prompt_ids_share_the_blocks_of_shared_prefix_hashes():
    a = LoadRequest("a", 0, 40, 1, prefix_hashes=(1, 2, 3), hash_block_size=16)
    b = LoadRequest("b", 0, 40, 1, prefix_hashes=(1, 2, 9), hash_block_size=16)
    pa, pb = load_client.prompt_ids(a, 1000, 0), load_client.prompt_ids(b, 1000, 0)
    assert len(pa) == len(pb) == 40 and pa[:32] == pb[:32] and pa[32:] != pb[32:] and max(pa) < 1000
    assert load_client.prompt_ids(a, 1000, 0) == pa and load_client.prompt_ids(LoadRequest("c", 0, 40, 1), 1000, 0) != pa
    assert len(load_client.prompt_text(a, 0).split()) == 40


def test_body_asks_for_the_traces_length_and_merges_extras():
    body = load_client.request_body("m", [1, 2], 5, SendOptions(extra_body={"top_p": 0.5, "ignore_eos": False}))
    assert body["max_tokens"] == 5 and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["top_p"] == 0.5 and body["ignore_eos"] is False and body["prompt"] == [1, 2]


def test_workload_from_a_trace_and_synthetic():
    spec = load_workload.WorkloadSpec(trace="sample:azure_conv_2023_first_10min.csv", speedup=4.0, max_requests=20)
    reqs = load_workload.build_load(spec)
    slow = load_workload.build_load(dataclasses.replace(spec, speedup=1.0))
    assert len(reqs) == 20 and reqs[0].arrival_s == 0 and reqs[-1].arrival_s == pytest.approx(slow[-1].arrival_s / 4)
    assert [r.prompt_len for r in reqs] == [r.prompt_len for r in slow]
    fit = load_workload.build_load(dataclasses.replace(spec, speedup=1.0, rate=2.0, max_context=1024))
    assert len(fit) == 20 and all(r.prompt_len + r.max_tokens <= 1024 for r in fit)
    assert fit[-1].arrival_s == pytest.approx(19 / 2.0)  # the rate of the requests sent, after the cuts
    syn = load_workload.build_load(load_workload.WorkloadSpec(arrivals="gamma", rate=5.0, cv=2.0, num_requests=30,
                                                              lengths="uniform:8,32"))  # fmt: skip
    assert len(syn) == 30 and all(8 <= r.prompt_len <= 32 and 8 <= r.max_tokens <= 32 for r in syn)


# -- whole runs over HTTP -------------------------------------------------------------------------------------


def write_profile(path):
    """A profile of a tiny model whose steps take 2 ms + 10 µs per token row (3 repeats)."""
    from jaxserve.calibration.grid import grid_points
    from jaxserve.calibration.profile_format import Profile, save_profile
    from jaxserve.model.config import ModelConfig
    from jaxserve.runtime.step_geometry import StepGeometry

    model = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, max_position_embeddings=4096)  # fmt: skip
    points = []
    for spec in grid_points("small"):
        shape = spec.point([1.0])
        t = 0.002 + 1e-5 * (sum(shape.prefill_chunk_lens) + len(shape.decode_context))
        points.append(spec.point([t, 1.01 * t, 0.99 * t]))
    save_profile(Profile(model=dataclasses.asdict(model), dtype="float32", device={"backend": "cpu", "kind": "cpu"},
                         block_size=16, points=tuple(points), engine=StepGeometry(attention="grouped"),
                         model_name="tiny", grid="small"), str(path))  # fmt: skip
    return path


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = bench_serving.main([*args, "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_replay_against_an_openai_compatible_server(fake_server, tmp_path, capsys):
    url, app = fake_server
    trace = tmp_path / "trace.csv"  # lengths chosen to hit every path of the fake server
    outputs = [5, 3, REFUSE_TOKENS, 4, BREAK_TOKENS, 6, HANG_TOKENS, 2]
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + "".join(
        f"{0.02 * i},{10 + i},{n}\n" for i, n in enumerate(outputs)))  # fmt: skip
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["--base-url", url, "--trace", str(trace), "--out", str(out), "--timeout", "1",
                                    "--compare-sim", "--profile", str(write_profile(tmp_path / "p.json")),
                                    "--sim-set", "scheduler.name=sarathi"], capsys)  # fmt: skip
    assert code == 0, stderr
    m = json.loads((out / "metrics.json").read_text())
    assert (m["num_requests"], m["num_finished"], m["num_rejected"], m["num_failed"]) == (8, 5, 1, 2)
    assert m["num_finished"] + m["num_rejected"] + m["num_failed"] == m["num_requests"]
    failures = " ".join(m["failures"])
    assert "timed out after N s" in failures and ("RemoteProtocolError" in failures or "Read" in failures), failures
    assert list(m["rejections"]) == ["HTTP Too Many Requests: the queue is full"]
    # the client cannot see a token before the server sends it
    assert m["ttft_s"]["p50"] >= FIRST_TOKEN_S and m["tbt_s"]["mean"] > 0
    assert m["load_client"]["prompt_mode"] == "ids" and m["load_client"]["model"] == "fake-model"
    rows = (out / "requests.csv").read_text().splitlines()
    assert len(rows) == 9 and "ttft_s" in rows[0]
    assert all((out / p).stat().st_size > 0 for p in ("latency_cdf.png", "latency_over_time.png", "queue_and_kv.png"))
    sent = [b for b in app.state.bodies if b.get("stream")]
    assert sorted(b["max_tokens"] for b in sent[-8:]) == sorted(outputs)
    assert all(b["ignore_eos"] and isinstance(b["prompt"], list) and b["model"] == "fake-model" for b in sent[-8:])
    # --compare-sim: the table on stdout, the rows in metrics.json, the simulator's metrics beside it
    assert "simulator vs live server" in stdout and "ttft_s.p50" in stdout
    cmp = m["compare_sim"]
    assert cmp["scheduler"] == "sarathi" and cmp["num_kv_blocks"] == KV_BLOCKS  # from the server's /metrics
    assert [r["metric"] for r in cmp["rows"]] == [f"{k}.{s}" if s else k for k, s in compare_sim.COMPARED]
    by = {r["metric"]: r for r in cmp["rows"]}
    assert by["ttft_s.p50"]["error"] == pytest.approx(by["ttft_s.p50"]["sim"] / by["ttft_s.p50"]["live"] - 1)
    sim = json.loads((out / "sim_metrics.json").read_text())
    assert sim["num_requests"] == 8 and sim["ttft_s"]["p50"] == by["ttft_s.p50"]["sim"]


def test_text_prompts_for_a_server_without_token_ids(tmp_path, capsys):
    app = fake_app(text_only=True)
    with serving(app) as url:
        code, _, stderr = run_cli(["--base-url", url, "--arrivals", "poisson", "--rate", "50", "--num-requests", "3",
                                   "--lengths", "fixed:6,2", "--out", str(tmp_path)], capsys)  # fmt: skip
    assert code == 0, stderr
    sent = [b for b in app.state.bodies if b.get("stream")]
    assert len(sent) == 3 and all(isinstance(b["prompt"], str) and len(b["prompt"].split()) == 6 for b in sent)
    assert json.loads((tmp_path / "metrics.json").read_text())["num_finished"] == 3


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--trace", "sample:azure_conv_2023_first_10min.csv", "--trace-format", "parquet"], "--trace-format"),
        (["--trace", "no/such/trace.csv"], "--trace no/such/trace.csv"),
        (["--arrivals", "poisson", "--lengths", "fixed:10"], "--lengths"),
        (["--arrivals", "poisson", "--lengths", "fixed:10,5"], "--rate"),
        (["--trace", "sample:azure_conv_2023_first_10min.csv", "--extra-body", "[1]"], "--extra-body"),
        (["--trace", "sample:azure_conv_2023_first_10min.csv", "--base-url", "http://127.0.0.1:9"], "--base-url"),
        (["--trace", "sample:azure_conv_2023_first_10min.csv", "--compare-sim", "--profile", "/no/profile.json"], "--profile"),
    ],
)
def test_bad_input_names_the_flag(args, needle, capsys):
    if "--base-url" not in args:
        args = [*args, "--base-url", "http://127.0.0.1:9"]  # never reached: the flags fail first
    try:
        code = bench_serving.main([*args, "--quiet"])
    except SystemExit as e:  # argparse's own errors (choices) exit 2 naming the argument
        code = e.code
    assert code == 2
    assert needle in capsys.readouterr().err


def test_a_refused_probe_names_the_flags(tmp_path, capsys):
    with serving(fake_app(text_only=True)) as url:
        code, _, stderr = run_cli(["--base-url", url, "--prompt-mode", "ids", "--arrivals", "poisson", "--rate", "5",
                                   "--lengths", "fixed:6,2", "--out", str(tmp_path)], capsys)  # fmt: skip
    assert code == 2 and "prompt must be a string" in stderr and "--prompt-mode" in stderr
