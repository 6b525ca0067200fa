"""Shared fixtures of the engine tests: one tiny random Llama checkpoint and one ModelRunner for the
whole session, so that every test module reuses the same compiled step shapes.

``tests/model/hf_checkpoints.py`` (the transformers reference) is importable as ``hf_checkpoints``
through pytest's ``pythonpath`` setting in pyproject.toml.

Compilation dominates the cost of these tests on CPU (about 3-4 s per new step shape and logits
flag, 0.5 s per shape for a further runner once the session's persistent cache holds it), so the
scenarios keep to a small set of bucket shapes: at most 2 decode rows and 2 prefill blocks per step
(``MAX_ROWS``) except where a test says otherwise.
"""

from __future__ import annotations

import pytest

from engine_testing import RUNNER_KV  # noqa: E402  (tests/engine is on sys.path under pytest)


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """``(model_dir, torch reference model)`` of the session's tiny random Llama."""
    from hf_checkpoints import make_checkpoint

    directory = str(tmp_path_factory.mktemp("llama"))
    return directory, make_checkpoint(directory, "llama")


@pytest.fixture(scope="session")
def llama_params(llama):
    from jaxserve.model.loader import load_model

    return load_model(llama[0])


@pytest.fixture(scope="session")
def runner(llama_params):
    """The session's ModelRunner on ``RUNNER_KV`` (64 pages of 4 tokens, 16 host pages for swap).

    Schedulers may use fewer device blocks than the runner has (block ids stay valid pages), which
    is how the preemption tests get a tight cache without another runner."""
    from jaxserve.engine.model_runner import ModelRunner

    cfg, params = llama_params
    return ModelRunner(cfg, params, RUNNER_KV)
