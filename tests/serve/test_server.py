"""The OpenAI-compatible server over real HTTP on 127.0.0.1 (an in-process uvicorn on a free port,
the tiny checkpoint): greedy outputs equal ``jaxserve.LLM.generate`` through httpx and the official
``openai`` client, streaming and not, text and token-id prompts, chat through the model's template;
models, health and metrics; bad requests get OpenAI-style 400s naming the field; 429 past the queue
limit."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

import jaxserve
from jaxserve.serve.testing import running_server

PROMPTS = [[5, 6, 7], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [60]]
NEW = 10
CHAT = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w22 w23 w24"}]


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def refs(llm):
    """Greedy completions of PROMPTS and of the chat prompt by ``LLM.generate`` (EOS stops them)."""
    chat_ids = [1, 3, 20, 21, 4, 22, 23, 24, 9]  # CHAT through conftest's template
    outs = llm.generate(PROMPTS + [chat_ids], jaxserve.SamplingParams(NEW, temperature=0.0))
    return {"completions": outs[:-1], "chat": outs[-1]}


@pytest.fixture(scope="module")
def url(llm, refs):
    with running_server(llm, model_name="tiny") as base:
        yield base


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=120, **kw)


def sse(url, path, body) -> list[dict]:
    """The events of a streaming response (``[DONE]`` checked and dropped)."""
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_greedy_completions_equal_llm_generate(url, refs):
    def one(i):
        p, ref = PROMPTS[i], refs["completions"][i]
        body = {"model": "tiny", "prompt": p if i % 2 else words(p), "max_tokens": NEW, "temperature": 0,
                "return_token_ids": True}  # fmt: skip
        r = post(url, "/v1/completions", body)
        assert r.status_code == 200, r.text
        out = r.json()
        choice = out["choices"][0]
        assert choice["token_ids"] == list(ref.token_ids) and choice["prompt_token_ids"] == p
        assert choice["text"] == ref.text and choice["finish_reason"] == ref.finish_reason
        assert out["usage"] == {"prompt_tokens": len(p), "completion_tokens": len(ref.token_ids),
                                "total_tokens": len(p) + len(ref.token_ids)}  # fmt: skip
        events = sse(url, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
        assert events[-1]["choices"] == [] and events[-1]["usage"] == out["usage"]
        chunks = [e["choices"][0] for e in events[:-1]]
        assert [t for c in chunks for t in c["token_ids"]] == list(ref.token_ids)
        assert "".join(c["text"] for c in chunks) == ref.text
        assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [ref.finish_reason]
        return out

    # Concurrently: the requests share the running batch.
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        list(pool.map(one, range(len(PROMPTS))))
    # A batch of prompts in one request: one choice each, in order.
    r = post(url, "/v1/completions", {"prompt": PROMPTS, "max_tokens": NEW, "temperature": 0, "return_token_ids": True})
    assert [c["token_ids"] for c in r.json()["choices"]] == [list(o.token_ids) for o in refs["completions"]]
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]


def test_the_openai_client(url, refs):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    ref = refs["completions"][0]
    out = client.completions.create(model="tiny", prompt=words(PROMPTS[0]), max_tokens=NEW, temperature=0)
    assert out.choices[0].text == ref.text and out.usage.completion_tokens == len(ref.token_ids)
    stream = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=NEW, temperature=0, stream=True,
                                       extra_body={"return_token_ids": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == refs["completions"][1].text
    assert [t for c in chunks for t in c.choices[0].token_ids] == list(refs["completions"][1].token_ids)
    chat = refs["chat"]
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, temperature=0)
    assert out.choices[0].message.content == chat.text and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == chat.finish_reason
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.text
    assert chunks[-1].choices[0].finish_reason == chat.finish_reason
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[1000], max_tokens=4)
    assert e.value.body["param"] == "prompt" and "vocabulary" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-served", prompt=[5], max_tokens=4)


def test_stop_strings_and_token_ids(url, refs):
    ref = refs["completions"][0]
    stop_at = 3  # the 4th generated word ends the text (not included)
    stop_word = f"w{ref.token_ids[stop_at]}"
    body = {"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0, "stop": [" " + stop_word]}
    first = ref.token_ids.index(ref.token_ids[stop_at])  # its first occurrence ends it
    expect = words(ref.token_ids[:first])
    out = post(url, "/v1/completions", body).json()["choices"][0]
    assert out["text"] == expect and out["finish_reason"] == "stop"
    events = sse(url, "/v1/completions", {**body, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == expect
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    # stop_token_ids: ends at (and includes) the id.
    out = post(url, "/v1/completions", {**body, "stop": None, "stop_token_ids": [ref.token_ids[stop_at]],
                                        "return_token_ids": True}).json()["choices"][0]  # fmt: skip
    assert out["token_ids"] == list(ref.token_ids[: first + 1]) and out["finish_reason"] == "stop"


def test_the_user_field_is_the_client(url):
    out = post(url, "/v1/completions", {"prompt": [5], "max_tokens": 2, "user": "tenant-a"}).json()
    log = url.app.state.serving.loop.log
    assert log.requests[log.index[out["id"] + "-0"]].client_id == "tenant-a"


def test_models_health_and_metrics(url):
    assert httpx.get(url + "/health").status_code == 200
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 256
    assert models["data"][0]["vocab_size"] == url.app.state.serving.vocab_size > 0
    before = metric_values(url)
    post(url, "/v1/completions", {"prompt": [5, 6], "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    after = metric_values(url)
    assert after["jaxserve:generation_tokens_total"] - before["jaxserve:generation_tokens_total"] == 4
    assert after["jaxserve:prompt_tokens_total"] - before["jaxserve:prompt_tokens_total"] == 2
    assert after['jaxserve:request_success_total{finished_reason="length"}'] - before[
        'jaxserve:request_success_total{finished_reason="length"}'] == 1  # fmt: skip
    assert after["jaxserve:e2e_request_latency_seconds_count"] == before["jaxserve:e2e_request_latency_seconds_count"] + 1
    assert after["jaxserve:inter_token_latency_seconds_count"] - before["jaxserve:inter_token_latency_seconds_count"] == 3
    for name in ("time_to_first_token_seconds_count", "request_queue_time_seconds_count", "kv_cache_usage_perc",
                 "num_requests_running", "num_requests_waiting", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "request_prefill_time_seconds_sum", "request_decode_time_seconds_sum"):  # fmt: skip
        assert "jaxserve:" + name in after, name
    assert after["jaxserve:kv_cache_blocks_used"] == 0 and after["jaxserve:num_requests_running"] == 0


def metric_values(url) -> dict[str, float]:
    """``/metrics`` as ``{name or name{extra labels}: value}`` (the model_name/engine labels dropped)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            extra = {k: v for k, v in s.labels.items() if k not in ("model_name", "engine", "le")}
            if "le" in s.labels:
                continue
            key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in extra.items()) + "}" if extra else "")
            out[key] = s.value
    return out


BAD = [
    # (body, status, param)
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": [5], "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": [5], "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": [5], "max_tokens": "8"}, 400, "max_tokens"),
    ({"prompt": [5], "max_tokens": 1.5}, 400, "max_tokens"),
    ({"prompt": [5], "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": [5], "max_tokens": 300}, 400, "max_tokens"),
    ({"prompt": [5] * 256, "max_tokens": 1}, 400, "prompt"),
    ({"prompt": [5, 96]}, 400, "prompt"),
    ({"prompt": [5, -1]}, 400, "prompt"),
    ({"prompt": [5, True]}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": {"a": 1}}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": [5], "temperature": -1}, 400, "temperature"),
    ({"prompt": [5], "temperature": "hot"}, 400, "temperature"),
    ({"prompt": [5], "top_p": 0}, 400, "top_p"),
    ({"prompt": [5], "top_p": 1.5}, 400, "top_p"),
    ({"prompt": [5], "top_k": -2}, 400, "top_k"),
    ({"prompt": [5], "seed": -1}, 400, "seed"),
    ({"prompt": [5], "n": 2}, 400, "n"),
    ({"prompt": [5], "logprobs": 2}, 400, "logprobs"),
    ({"prompt": [5], "stream": "yes"}, 400, "stream"),
    ({"prompt": [5], "stop_token_ids": [500]}, 400, "stop_token_ids"),
    ({"prompt": [5], "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": [5], "model": "other"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[json.dumps(b)[:40] for b, _, _ in BAD])
def test_bad_completion_requests_get_an_openai_error_naming_the_field(url, body, status, param):
    r = post(url, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_bad_bodies_and_chat_requests(url):
    for content, headers in ((b"{not json", {"content-type": "application/json"}), (b"[1, 2]", {}), (b"", {}),
                             (b"null", {}), (b'{"prompt": [5], "temperature": NaN}', {})):  # fmt: skip
        r = httpx.post(url + "/v1/completions", content=content, headers=headers, timeout=60)
        assert r.status_code == 400 and "error" in r.json(), (content, r.text)
    for body, param in (({"messages": []}, "messages"), ({"messages": [{"content": "w5"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
                        ({"messages": CHAT[::-1]}, "messages"),  # the template raises: system not first
                        ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
                        ({"messages": CHAT, "max_tokens": 4, "max_completion_tokens": 4}, "max_completion_tokens"),
                        ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools")):  # fmt: skip
        r = post(url, "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert httpx.get(url + "/v1/nowhere").status_code == 404
    assert httpx.get(url + "/v1/completions").status_code == 405


def test_without_a_tokenizer_or_chat_template(url, refs):
    serving = url.app.state.serving
    tokenizer, template = serving.tokenizer, serving.chat_template
    try:
        serving.chat_template = None
        r = post(url, "/v1/chat/completions", {"messages": CHAT})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        serving.tokenizer = None
        # Token ids always come back (the only output there is), text is empty.
        out = post(url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0}).json()
        assert out["choices"][0]["token_ids"] == list(refs["completions"][0].token_ids) and out["choices"][0]["text"] == ""
        for body in ({"prompt": "w5 w6"}, {"prompt": [5], "stop": "w7"}):
            r = post(url, "/v1/completions", body)
            assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
        r = post(url, "/v1/chat/completions", {"messages": CHAT})
        assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
    finally:
        serving.tokenizer, serving.chat_template = tokenizer, template


def test_queue_limit_gives_429(url):
    loop = url.app.state.serving.loop
    try:
        loop.max_queue = 0  # every new request would wait beyond the limit
        r = post(url, "/v1/completions", {"prompt": [5], "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": [5], "stream": True}, timeout=60) as s:
            assert s.status_code == 429
    finally:
        loop.max_queue = None
    assert post(url, "/v1/completions", {"prompt": [5], "max_tokens": 2}).status_code == 200


def test_requests_the_engine_refuses_late_get_400(url):
    serving = url.app.state.serving
    vocab = serving.vocab_size
    try:
        serving.vocab_size = 1000  # the server's own check lets id 500 through; the engine's runner refuses it
        for stream in (False, True):
            r = post(url, "/v1/completions", {"prompt": [5, 500], "max_tokens": 2, "stream": stream})
            assert r.status_code == 400 and "outside the vocabulary [0, 96)" in r.json()["error"]["message"], r.text
    finally:
        serving.vocab_size = vocab
    assert url.app.state.serving.loop.snapshot.num_unfinished == 0


def test_a_step_failing_mid_stream_ends_that_stream_with_an_error_event(url, refs):
    loop = url.app.state.serving.loop
    recording = loop.replica.executor  # the loop's wrapper around the runner
    runner = recording._executor
    ref = refs["completions"][0].token_ids
    poison = ref[2]  # the first decode step that feeds this token back fails

    class Failing:
        def __getattr__(self, name):
            return getattr(runner, name)

        def execute(self, plan):
            if any(n == 1 and t == poison for n, t in zip(plan.num_new_tokens.tolist(), plan.token_ids.tolist())):
                raise FloatingPointError("injected fault")
            return runner.execute(plan)

    recording._executor = Failing()
    try:
        events = sse(url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0, "stream": True,
                                             "return_token_ids": True})  # fmt: skip
    finally:
        recording._executor = runner
    assert [t for e in events[:-1] for t in e["choices"][0]["token_ids"]] == list(ref[: ref.index(poison) + 1])
    error = events[-1]["error"]
    assert error["code"] == 500 and "injected fault" in error["message"]
    # The server goes on.
    out = post(url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0, "return_token_ids": True})
    assert out.json()["choices"][0]["token_ids"] == list(ref)
