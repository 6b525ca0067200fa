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
    for n in splits + [len(text)]:
        piece = text[i : i + n]
        i += len(piece)
        delta, stopped = s.add(piece, final=i >= len(text))
        sent.append(delta)
        if stopped or i >= len(text):
            break
    positions = [text.find(x) for x in stops if x in text]
    expect = text[: min(positions)] if positions else text
    assert "".join(sent) == expect and stopped == bool(positions)


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
