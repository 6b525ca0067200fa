"""jaxserve.LLM end to end on tiny random Hugging Face checkpoints: greedy tokens equal
``transformers`` generate token for token (Llama, Mistral past its sliding window, Qwen2), for
whole-prompt and chunked-prefill scheduling; prompt order, stop tokens, tokenizers and errors."""

from __future__ import annotations

import os
import shutil

import pytest
from engine_testing import MAX_ROWS, RUNNER_KV, VOCAB, greedy, prompt
from hf_checkpoints import hf_greedy, make_checkpoint

import jaxserve
from jaxserve.request import SamplingParams

EOS = 2  # hf_checkpoints' eos_token_id: LLM stops at it by default
SCHEDULERS = {
    "vllm": {"max_num_seqs": MAX_ROWS},
    "sarathi": {"max_num_seqs": MAX_ROWS, "chunk_size": 8},  # 20-token prompts take 3 chunks
}
# Three prompts, two at a time: the third starts only when the first two are done; the first one
# (20 tokens) is longer than Mistral's sliding window of 12. Sarathi computes the first in
# chunks 8 + 8 + 4 and the second (4 tokens) beside its last chunk, so both schedulers run the same
# four step shapes (compilation is what these tests spend their time on).
PROMPTS = [prompt(80, 20), prompt(81, 4), prompt(82, 13)]
NEW = 8


def make_llm(model_dir, scheduler="vllm", **kw):
    # The runner tests' cache shape (64 pages of 4 tokens): Llama reuses their compiled steps.
    kw = {"num_blocks": RUNNER_KV.num_blocks, "block_size": RUNNER_KV.block_size, **kw}
    return jaxserve.LLM(model_dir, scheduler=scheduler, scheduler_options=dict(SCHEDULERS[scheduler]), **kw)


def truncate(tokens, stops):
    """What a generation with these stop ids returns: up to and including the first stop."""
    for i, t in enumerate(tokens):
        if t in stops:
            return list(tokens[: i + 1])
    return list(tokens)


@pytest.fixture(scope="module")
def checkpoints(llama, tmp_path_factory):
    out = {"llama": llama}
    for arch in ("mistral", "qwen2"):
        directory = str(tmp_path_factory.mktemp(arch))
        out[arch] = (directory, make_checkpoint(directory, arch))
    return out


@pytest.fixture(scope="module")
def llms(checkpoints):
    """One LLM per (arch, scheduler) for the module: each instance traces its step shapes anew."""
    cache = {}

    def get(arch, scheduler="vllm"):
        if (arch, scheduler) not in cache:
            cache[arch, scheduler] = make_llm(checkpoints[arch][0], scheduler)
        return cache[arch, scheduler]

    return get


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_generate_matches_transformers(checkpoints, llms, arch, scheduler):
    model = checkpoints[arch][1]
    llm = llms(arch, scheduler)
    if arch == "mistral":
        assert llm.cfg.sliding_window == 12 < len(PROMPTS[0])
    # Llama's runs reuse the runner tests' compiled shapes; the others compile their own, so they
    # get the first two prompts only (three shapes instead of four).
    prompts = PROMPTS if arch == "llama" else PROMPTS[:2]
    outs = llm.generate(prompts, greedy(NEW))
    assert len(outs) == len(prompts)
    for p, out in zip(prompts, outs):
        expect = truncate(hf_greedy(model, p, NEW), {EOS})
        assert out.prompt_token_ids == tuple(p)  # completions come back in prompt order
        assert list(out.token_ids) == expect, f"{arch}/{scheduler} prompt of {len(p)}"
        assert out.finish_reason == ("length" if len(expect) == NEW else "stop")
        assert out.text is None  # no tokenizer.json
    assert len({o.request_id for o in outs}) == len(outs)
    if scheduler == "sarathi":
        assert llm.scheduler.chunk_size == 8


def test_generate_order_stop_tokens_and_rejections(checkpoints, llms):
    model = checkpoints["llama"][1]
    llm = llms("llama", "sarathi")
    # The longest prompt first: with two sequences at a time the short ones finish first.
    prompts = [prompt(90, 31), prompt(91, 3), prompt(92, 9), prompt(93, 260)]
    refs = [hf_greedy(model, p, 10) for p in prompts[:3]]
    # A stop id that the first prompt meets after a few tokens (and not before).
    stop = next(t for i, t in enumerate(refs[0]) if i >= 2 and t not in refs[0][:i] and t != EOS)
    sampling = SamplingParams(10, temperature=0.0, stop_token_ids=(stop,))
    # By default a prompt over the context raises, naming it, before anything runs (as vLLM).
    with pytest.raises(ValueError, match=r"prompt 3 \(request '.*'\) cannot be served: .*exceeds max_model_len=256"):
        llm.generate(prompts, sampling)
    outs = llm.generate(prompts, sampling, return_rejections=True)
    assert [o.prompt_token_ids for o in outs] == [tuple(p) for p in prompts]
    for ref, out in zip(refs, outs[:3]):
        expect = truncate(ref, {stop, EOS})
        assert list(out.token_ids) == expect
        assert out.finish_reason == ("stop" if len(expect) < 10 else "length")
    assert outs[0].finish_reason == "stop" and outs[0].token_ids[-1] == stop
    # Too long for max_model_len (256): rejected, reported in order, the others unaffected.
    assert outs[3].token_ids == () and outs[3].finish_reason.startswith("rejected: ")
    assert "256" in outs[3].finish_reason
    # The same LLM again: fresh request ids, the same greedy tokens.
    again = llm.generate(prompts[:1], SamplingParams(10, temperature=0.0, stop_token_ids=(stop,)))[0]
    assert again.token_ids == outs[0].token_ids and again.request_id not in {o.request_id for o in outs}


def test_text_prompts_with_a_tokenizer(checkpoints, llms, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_dir, model = checkpoints["llama"]
    with_tok = tmp_path / "with_tokenizer"
    shutil.copytree(model_dir, with_tok)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(with_tok / "tokenizer.json"))
    llm = make_llm(str(with_tok), stop_at_eos=False)
    # A prompt whose transformers continuation contains EOS: stop_at_eos=False generates through it.
    ids = next(p for p in (prompt(s, 7) for s in range(95, 200)) if EOS in hf_greedy(model, p, 12)[:-1])
    out = llm.generate([" ".join(f"w{i}" for i in ids)], greedy(12))[0]
    assert list(out.prompt_token_ids) == ids
    assert list(out.token_ids) == hf_greedy(model, ids, 12)
    assert out.text == " ".join(f"w{i}" for i in out.token_ids)
    # By default (stop_at_eos) the same prompt ends at that EOS, as a stop.
    eos_out = llms("llama").generate([ids], greedy(12))[0]
    assert list(eos_out.token_ids) == truncate(out.token_ids, {EOS}) and eos_out.token_ids[-1] == EOS
    assert eos_out.finish_reason == "stop"


def test_errors(checkpoints, llms, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxserve.LLM(str(tmp_path / "no_such_model"))
    llm = llms("llama")
    assert llm.tokenizer is None and not os.path.exists(os.path.join(llm.model_dir, "tokenizer.json"))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        llm.generate(["hello world"])
    with pytest.raises(ValueError, match="unknown scheduler"):
        jaxserve.LLM(checkpoints["llama"][0], scheduler="no_such_policy")
