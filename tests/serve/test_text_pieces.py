"""The server's pure pieces: incremental detokenization, stop strings, chat templates, the metrics'
token buckets and the CLI's scheduler options."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxserve.serve.chat import ChatTemplate, ChatTemplateError
from jaxserve.serve.cli import key_values, parser
from jaxserve.serve.detokenize import Detokenizer, StopStrings
from jaxserve.serve.metrics import one_two_five_buckets


class ByteTokenizer:
    """Token i is byte i (UTF-8 characters span several tokens), decoded as the HF tokenizers do:
    invalid or incomplete sequences become U+FFFD."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@given(st.text(max_size=30), st.lists(st.integers(1, 4), max_size=40))
def test_detokenized_deltas_add_up_to_the_whole_text(text, splits):
    ids = list(text.encode("utf-8"))
    detok, out, i = Detokenizer(ByteTokenizer()), [], 0
    for n in splits + [len(ids)]:
        chunk = ids[i : i + n]
        i += len(chunk)
        delta = detok.add(chunk, final=i == len(ids))
        assert "\ufffd" not in delta  # a split character is held back, never sent half
        out.append(delta)
        if i == len(ids):
            break
    assert "".join(out) == text


@given(st.text(alphabet="abc", max_size=30), st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=3),
       st.lists(st.integers(1, 5), max_size=30))  # fmt: skip
def test_stop_strings_cut_at_the_first_stop_and_never_leak_one(text, stops, splits):
    s, sent, i, stopped = StopStrings(stops), [], 0, False
    expect, expect_stop = text, False
    for n in splits + [len(text)]:
        piece = text[i : i + n]
        i += len(piece)
        delta, stopped = s.add(piece, final=i >= len(text))
        sent.append(delta)
        # A stream ends at the first piece after which the text so far holds a stop string, cut
        # where the earliest of those it holds begins (one that completes later never counts).
        positions = [text[:i].find(x) for x in stops if x in text[:i]]
        if positions:
            expect, expect_stop = text[: min(positions)], True
        if stopped or i >= len(text) or positions:
            break
    assert "".join(sent) == expect and stopped == expect_stop


def test_chat_templates_from_a_model_directory(tmp_path):
    assert ChatTemplate.from_dir(str(tmp_path)) is None
    source = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "chat_template": source}))
    t = ChatTemplate.from_dir(str(tmp_path))
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>[user]hi[assistant]"
    assert t.render([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "<s>[user]hi"
    # Named templates (a list), and chat_template.jinja taking precedence.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": "D"},
                                                                                   {"name": "tool_use", "template": "T"}]}))  # fmt: skip
    assert ChatTemplate.from_dir(str(tmp_path)).render([]) == "D"
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no ' ~ messages[0]['role']) }}")
    with pytest.raises(ChatTemplateError, match="no user"):
        ChatTemplate.from_dir(str(tmp_path)).render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="cannot render"):
        ChatTemplate("{{ messages[5]['content'].upper() }}").render([])
    # The sandbox: no attribute access to Python internals.
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])


def test_token_buckets_and_cli_options():
    assert one_two_five_buckets(256) == (1, 2, 5, 10, 20, 50, 100, 200)
    assert one_two_five_buckets(1) == (1,)
    assert key_values(["chunk_size=256", "order=fcfs", "enable_prefix_caching=true"]) == {
        "chunk_size": 256, "order": "fcfs", "enable_prefix_caching": True}  # fmt: skip
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        key_values(["chunk_size"])
    args = parser().parse_args(["--model", "m", "--scheduler", "sarathi", "--tp", "2", "--max-queue", "5"])
    assert (args.model, args.scheduler, args.tp, args.max_queue, args.port, args.replicas) == ("m", "sarathi", 2, 5, 8000, 1)


def test_server_metrics_observe_vllm_meanings():
    from prometheus_client.parser import text_string_to_metric_families

    from jaxserve.serve.engine_loop import RequestTimes, Snapshot, StepStats
    from jaxserve.serve.metrics import ServerMetrics

    class Loop:
        snapshot = Snapshot(num_running=3, num_waiting=2, kv_blocks_used=10, kv_usage=0.25, num_steps=7, num_unfinished=5)
        num_waiting = 4  # (the inbox counted too)

    m = ServerMetrics("tiny", 256, Loop())
    m.on_step(StepStats(1.0, 3, 2, 0.25, new_prompt_tokens=9, generation_tokens=3, num_preemptions=1,
                        prefix_queries=9, prefix_hits=4, num_tokens=12))  # fmt: skip
    m.on_token("a", 0.05)
    m.on_finish(RequestTimes("a", 1.0, 1.5, 2.0, 4.0, 4.5, prompt_tokens=9, output_tokens=5, finish_reason="length"))
    m.on_finish(RequestTimes("b", 1.0, float("nan"), float("nan"), float("nan"), 2.0, 3, 0, "abort"))
    values = {s.name + str(sorted((k, v) for k, v in s.labels.items() if k == "finished_reason")): s.value
              for f in text_string_to_metric_families(m.render().decode()) for s in f.samples if "le" not in s.labels}  # fmt: skip
    v = {k.replace("[]", ""): x for k, x in values.items()}
    assert (v["jaxserve:num_requests_running"], v["jaxserve:num_requests_waiting"], v["jaxserve:kv_cache_usage_perc"]) == (3, 4, 0.25)
    assert (v["jaxserve:prompt_tokens_total"], v["jaxserve:generation_tokens_total"], v["jaxserve:num_preemptions_total"]) == (9, 3, 1)
    assert (v["jaxserve:prefix_cache_queries_total"], v["jaxserve:prefix_cache_hits_total"]) == (9, 4)
    # Only the request that finished by itself is in the latency histograms.
    assert v["jaxserve:time_to_first_token_seconds_sum"] == 1.0 and v["jaxserve:time_to_first_token_seconds_count"] == 1
    assert v["jaxserve:e2e_request_latency_seconds_sum"] == 3.5 and v["jaxserve:request_queue_time_seconds_sum"] == 0.5
    assert v["jaxserve:request_prefill_time_seconds_sum"] == 0.5 and v["jaxserve:request_decode_time_seconds_sum"] == 2.5
    assert v["jaxserve:request_inference_time_seconds_sum"] == 3.0
    assert v["jaxserve:request_time_per_output_token_seconds_sum"] == 0.5  # (4.0 - 2.0) / (5 - 1)
    assert v["jaxserve:inter_token_latency_seconds_sum"] == 0.05
    assert v["jaxserve:request_success_total[('finished_reason', 'length')]"] == 1
    assert v["jaxserve:request_success_total[('finished_reason', 'abort')]"] == 1
