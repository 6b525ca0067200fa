"""ModelRunner.read_kv / write_kv: a request's KV pages copied to another runner (a different pool
size, different block ids) are the same bytes there, and a decode continued on that runner from
them samples the same tokens as on the first; a bad payload or block is a ValueError naming it.

Plans are built by hand (two requests, one greedy and one seeded-sampling, in every step), so the
runs stay within two step shapes: a prefill of two rows (2 prefill blocks) and two decode rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_testing import RUNNER_KV, greedy, prompt, request

from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan
from jaxserve.request import SamplingParams

BS = RUNNER_KV.block_size
REQUESTS = [
    request("kv-greedy", prompt(700, 10), greedy(16)),
    request("kv-sampled", prompt(701, 7), SamplingParams(max_new_tokens=16, temperature=0.9, top_k=20, seed=11)),
]
# Block tables on the first runner (64 pages) and on the second (40 pages): other ids, other order.
TABLES_A = {"kv-greedy": [5, 9, 2, 7, 30, 31], "kv-sampled": [12, 0, 44, 63, 50, 51]}
TABLES_B = {"kv-greedy": [30, 1, 17, 22, 3, 4], "kv-sampled": [39, 8, 11, 25, 26, 27]}
NUM_DECODES_BEFORE = 6  # decode steps on the first runner before the pages are copied (4 pages each)
NUM_DECODES_AFTER = 4  # decode steps on both runners after it


def make_plan(rows, step: int) -> BatchPlan:
    """``rows``: ``(request id, tokens already in KV, new token ids, block table)``; every row samples."""
    tables = tuple(tuple(t[: -(-(c + len(ids)) // BS)]) for _, c, ids, t in rows)
    return BatchPlan(
        request_ids=tuple(r[0] for r in rows),
        num_computed_tokens=np.array([r[1] for r in rows], np.int64),
        num_new_tokens=np.array([len(r[2]) for r in rows], np.int64),
        samples_token=np.ones(len(rows), bool),
        block_tables=tables,
        token_ids=np.array([t for r in rows for t in r[2]], np.int32),
        block_size=BS,
        step=step,
    )


def decode(runner, tables, computed: dict, last: dict, num_steps: int, step: int) -> dict[str, list[int]]:
    """``num_steps`` decode steps of every request from ``computed`` tokens in KV and ``last`` sampled."""
    computed, last, out = dict(computed), dict(last), {r.request_id: [] for r in REQUESTS}
    for k in range(num_steps):
        rows = [(rid, computed[rid], [last[rid]], tables[rid]) for rid in out]
        plan = make_plan(rows, step + k)
        plan.validate()
        sampled = runner.execute(plan).token_ids
        for rid in out:
            computed[rid] += 1
            last[rid] = sampled[rid]
            out[rid].append(sampled[rid])
    return out


def kv_blocks(table, num_tokens: int) -> list[int]:
    return list(table[: -(-num_tokens // BS)])


@pytest.fixture(scope="module")
def second(llama_params):
    """A second runner with a smaller pool (40 pages) and no host pool."""
    from jaxserve.engine.model_runner import ModelRunner

    cfg, params = llama_params
    return ModelRunner(cfg, params, KVConfig(num_blocks=40, block_size=BS))


@pytest.fixture
def registered(runner, second):
    for r in REQUESTS:
        runner.register(r)
        second.register(r)
    yield
    for r in REQUESTS:
        runner.release(r.request_id)
        second.release(r.request_id)


def test_pages_copied_to_another_runner_continue_the_same_decode(runner, second, registered):
    # Prefill both requests, then decode a few steps on the first runner.
    prefill = make_plan([(r.request_id, 0, list(r.prompt_token_ids), TABLES_A[r.request_id]) for r in REQUESTS], 0)
    first = dict(runner.execute(prefill).token_ids)
    computed = {r.request_id: r.prompt_len for r in REQUESTS}
    before = decode(runner, TABLES_A, computed, first, NUM_DECODES_BEFORE, step=1)
    computed = {rid: n + NUM_DECODES_BEFORE for rid, n in computed.items()}
    last = {rid: toks[-1] for rid, toks in before.items()}

    # Copy every page holding the requests' KV (the last token sampled is not in KV yet).
    payloads = {}
    for rid, n in computed.items():
        src, dst = kv_blocks(TABLES_A[rid], n), kv_blocks(TABLES_B[rid], n)
        assert len(src) == 4  # the prefill's pages and at least one the decodes started
        payloads[rid] = runner.read_kv(src)
        assert payloads[rid].shape == (runner.cfg.num_layers, 2, runner.cfg.num_kv_heads, len(src), BS, runner.cfg.head_dim)
        assert payloads[rid].dtype == runner.host_dtype and np.any(payloads[rid] != 0)
        second.write_kv(dst, payloads[rid])
    # The second runner's pages are the same bytes; pages nobody wrote are still zero.
    for rid, n in computed.items():
        dst = kv_blocks(TABLES_B[rid], n)
        assert second.read_kv(dst).tobytes() == payloads[rid].tobytes()
        assert second.read_kv(list(reversed(dst))).tobytes() == payloads[rid][:, :, :, ::-1].tobytes()
    assert not np.any(second.read_kv([2, 5, 38]))

    # Continuing the decode on either runner samples the same tokens (greedy and seeded).
    step = 1 + NUM_DECODES_BEFORE
    on_first = decode(runner, TABLES_A, computed, last, NUM_DECODES_AFTER, step)
    on_second = decode(second, TABLES_B, computed, last, NUM_DECODES_AFTER, step)
    assert on_second == on_first
    assert len(set(on_first["kv-sampled"])) > 1  # the sampled request really samples


def test_write_kv_refuses_a_wrong_payload_or_block(runner, second):
    shape = (runner.cfg.num_layers, 2, runner.cfg.num_kv_heads, 2, BS, runner.cfg.head_dim)
    good = np.ones(shape, runner.host_dtype)
    with pytest.raises(ValueError, match=r"payload of shape .* needed for 2 blocks, got \(.*, 3, .*\)"):
        second.write_kv([5, 6], np.ones(shape[:3] + (3,) + shape[4:], runner.host_dtype))
    with pytest.raises(ValueError, match="needed for 2 blocks, got None"):
        second.write_kv([5, 6], None)
    with pytest.raises(ValueError, match=r"KV block 40 is outside this runner's pool \[0, 40\)"):
        second.write_kv([5, 40], good)  # the first runner's pool has a page 40, this one has not
    with pytest.raises(ValueError, match=r"KV block -1 is outside"):
        second.write_kv([-1, 6], good)
    with pytest.raises(ValueError, match=r"KV block 64 is outside this runner's pool \[0, 64\)"):
        runner.read_kv([3, 64])
    assert not np.any(second.read_kv([5, 6]))  # nothing was written by the refused calls
    second.write_kv([], np.ones(shape[:3] + (0,) + shape[4:], runner.host_dtype))  # nothing to write
