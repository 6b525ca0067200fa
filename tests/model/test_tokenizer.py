"""jaxserve.model.tokenizer.Tokenizer on tiny tokenizer.json files built locally with ``tokenizers``."""

from __future__ import annotations

import json

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from jaxserve.model.config import CheckpointError  # noqa: E402
from jaxserve.model.tokenizer import TOKENIZER_FILE, Tokenizer  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Schedulers decide which requests run in each step!",
    "Ünïcödé tëxt, émojis 🙂 and numbers 12345 are bytes too.",
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (GPT-2 / Llama 3 style) that prepends <s> to every encoding."""
    d = tmp_path_factory.mktemp("tok_bpe")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(d / TOKENIZER_FILE))
    return d, tok


@pytest.mark.parametrize(
    "text",
    CORPUS + ["unseen wörds: qzx 42 ∑", "  leading and trailing spaces  ", "line\nbreaks\tand tabs", ""],
)
def test_round_trip(bpe_dir, text):
    d, reference = bpe_dir
    tok = Tokenizer.from_dir(str(d))
    ids = tok.encode(text)
    assert ids == reference.encode(text).ids  # exactly the library's encoding
    assert all(isinstance(i, int) for i in ids)
    assert ids[0] == reference.token_to_id("<s>")  # the post-processor's BOS
    assert tok.decode(ids) == text  # special tokens skipped by default
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_merges_are_used(bpe_dir):
    d, _ = bpe_dir
    tok = Tokenizer(str(d / TOKENIZER_FILE))
    text = "The quick brown fox"
    ids = tok.encode(text, add_special_tokens=False)
    assert 0 < len(ids) < len(text.encode())  # trained merges: fewer tokens than bytes
    assert tok.decode(tuple(ids)) == text  # any sequence of ids


def test_word_level(tmp_path):
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, ",": 3, "again": 4}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / TOKENIZER_FILE))
    ours = Tokenizer.from_dir(str(tmp_path))
    assert ours.encode("hello world , again") == [1, 2, 3, 4]
    assert ours.encode("hello there") == [1, 0]
    assert ours.decode([1, 2, 4]) == "hello world again"
    assert ours.path == str(tmp_path / TOKENIZER_FILE)


def test_from_dir_without_tokenizer(tmp_path):
    assert Tokenizer.from_dir(str(tmp_path)) is None


@pytest.mark.parametrize(
    "content",
    [
        "{this is not json",
        json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}),
        json.dumps([1, 2, 3]),
        "",
    ],
)
def test_malformed_tokenizer_json(tmp_path, content):
    path = tmp_path / TOKENIZER_FILE
    path.write_text(content)
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_dir(str(tmp_path))
    assert str(path) in str(e.value) and "tokenizer" in str(e.value)


def test_missing_file_given_explicitly(tmp_path):
    with pytest.raises(CheckpointError, match="cannot load tokenizer"):
        Tokenizer(str(tmp_path / "nope.json"))
