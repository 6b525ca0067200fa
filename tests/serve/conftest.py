"""Fixtures of the server tests: a tiny random Llama checkpoint with a word-level tokenizer and a chat
template, one ``jaxserve.LLM`` over it, greedy references from ``LLM.generate`` computed before the
server takes the engine over, and one in-process server for the module (compiling the tiny model's
step shapes is what these tests spend their time on, so they share it)."""

from __future__ import annotations

import json
import shutil

import pytest

VOCAB = 96  # tests/model/hf_checkpoints.py
# Words w0..w95 are the ids 0..95; the template writes "w1" (bos), each message as "w<role> content", then "w9".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('the system message must come first') }}{% endif %}"
    "{{ ' w' ~ {'system': 3, 'user': 4, 'assistant': 5}[m['role']] ~ ' ' ~ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %} w9{% endif %}"
)
LLM_OPTIONS = dict(scheduler="sarathi", scheduler_options={"max_num_seqs": 8, "chunk_size": 16}, num_blocks=160, block_size=4)


def add_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "w1", "eos_token": {"content": "w2"}, "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a tokenizer and a chat template."""
    from hf_checkpoints import make_checkpoint

    directory = tmp_path_factory.mktemp("serve_llama")
    make_checkpoint(str(directory), "llama")
    add_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def plain_model_dir(model_dir, tmp_path_factory):
    """The same checkpoint without tokenizer files."""
    directory = tmp_path_factory.mktemp("serve_llama_plain") / "model"
    shutil.copytree(model_dir, directory, ignore=shutil.ignore_patterns("tokenizer*"))
    return directory


@pytest.fixture(scope="session")
def llm(model_dir):
    import jaxserve

    return jaxserve.LLM(str(model_dir), **LLM_OPTIONS)
