"""Every registered scheduler serves a small workload to completion."""

import pytest

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.scheduler.driver import drive


@pytest.mark.parametrize("name", jaxserve.scheduler.available())
def test_every_scheduler_finishes_a_small_workload(name):
    requests = [
        jaxserve.Request(f"r{i}", prompt_token_ids=list(range(1, 20 + 7 * i)), sampling=jaxserve.SamplingParams(5 + i))
        for i in range(6)
    ]
    result = drive(jaxserve.scheduler.make(name), KVConfig(num_blocks=32, block_size=4), requests)
    assert set(result.finished) == {r.request_id for r in requests}
    for r in requests:
        assert len(result.finished[r.request_id].output_token_ids) == r.sampling.max_new_tokens
