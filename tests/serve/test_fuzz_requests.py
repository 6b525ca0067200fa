"""Property-based fuzzing of request bodies over real HTTP: whatever JSON (or bytes) a client sends to
either endpoint, the server answers with a 2xx or a 4xx carrying OpenAI's error object, never a 5xx,
and it stays up."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve.serve.testing import running_server

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "n", "stream", "stream_options", "stop", "stop_token_ids", "ignore_eos", "return_token_ids",
          "logprobs", "echo", "best_of", "presence_penalty", "logit_bias", "add_generation_prompt",
          "chat_template_kwargs", "tools", "user"]  # fmt: skip

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 300),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
)  # fmt: skip
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)  # fmt: skip
token_ids = st.lists(st.integers(0, 100), max_size=12)  # ids past 95 are outside the vocabulary
words = st.lists(st.integers(0, 99), max_size=10).map(lambda ids: " ".join(f"w{i}" for i in ids))
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": words})
# Near-valid bodies reach the deep checks (context, vocabulary, sampling, templates, streaming): a
# body valid but for its prompt's ids, half of them with one field replaced by any JSON value.
valid = st.fixed_dictionaries(
    {"max_tokens": st.integers(1, 6), "stream": st.booleans(), "prompt": token_ids | words | st.lists(token_ids, max_size=3),
     "messages": st.lists(message, max_size=3)},  # (each endpoint ignores the other's field)
    optional={
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 200),
        "seed": st.integers(0, 2**40), "stop": st.text(alphabet="w0123456789 ", max_size=4),
        "stop_token_ids": st.lists(st.integers(0, 95), max_size=3), "ignore_eos": st.booleans(),
        "return_token_ids": st.booleans(), "model": st.just("tiny"),
    },
)  # fmt: skip
plausible = valid | st.tuples(valid, st.sampled_from(FIELDS), json_values).map(lambda t: {**t[0], t[1]: t[2]})
arbitrary = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), json_values, max_size=6)
bodies = plausible | plausible | arbitrary | json_values


@pytest.fixture(scope="module")
def url(llm):
    with running_server(llm, model_name="tiny") as base:
        yield base


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies, chat=st.booleans())
def test_fuzzed_json_bodies_never_get_a_5xx(url, body, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    # Streaming answers are read to the end: an error after the headers would be an error event.
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        r.read()
    check(r)
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64) | st.text(max_size=64).map(str.encode), chat=st.booleans())
def test_fuzzed_raw_bodies_never_get_a_5xx(url, content, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    check(httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=60))


def test_the_server_is_still_up_after_fuzzing(url):
    assert httpx.get(url + "/health").status_code == 200
    loop = url.app.state.serving.loop
    assert loop.snapshot.num_unfinished == 0 and loop.replica.state.kv.device.num_used == 0
