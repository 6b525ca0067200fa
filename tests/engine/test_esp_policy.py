"""The ESP policy (``engine/esp_policy.py``) and page map (``engine/esp_pages.py``) without a model:
prefill degrees, proactive scale-down plans, scale-up, the zig-zag staging layout, and pages that
stay on exactly one device and come back on release."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine.esp_pages import EspPages
from jaxserve.engine.esp_policy import (
    EspPolicy,
    decode_shards,
    next_device,
    prefill_degree,
    prefill_group,
    zigzag_assignment,
)
from jaxserve.plan import BatchPlan


def test_prefill_degree_grows_with_the_prompt_and_an_explicit_one_wins():
    policy = EspPolicy(prefill_tokens_per_device=100)
    assert [prefill_degree(policy, n, 8) for n in (1, 100, 101, 399, 401, 10_000)] == [1, 1, 2, 4, 5, 8]
    assert prefill_degree(policy, 10_000, 8, explicit=2) == 2
    with pytest.raises(ValueError, match=r"prefill degree must be in \[1, 8\]"):
        prefill_degree(policy, 10, 8, explicit=9)


@pytest.mark.parametrize("bad", [{"prefill_tokens_per_device": 0}, {"decode_pages_per_device": 0}])
def test_bad_policy_values_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EspPolicy(**bad)


def test_decode_shards_pack_onto_the_fewest_emptiest_devices():
    assert decode_shards(EspPolicy(), 5, [3, 8, 8, 2]) == ((1, 5),)  # one device holds it all
    assert decode_shards(EspPolicy(), 12, [3, 8, 6, 2]) == ((1, 8), (2, 4))
    assert decode_shards(EspPolicy(decode_pages_per_device=4), 10, [8, 8, 8, 8]) == ((0, 4), (1, 4), (2, 2))
    assert decode_shards(EspPolicy(), 30, [3, 8, 6, 2]) == ((1, 8), (2, 6), (0, 3), (3, 2))  # short: scale up later
    assert decode_shards(EspPolicy(), 3, [0, 0]) == ((0, 3),)


def test_next_device_fills_the_plan_then_scales_up_to_the_emptiest():
    shards = ((1, 2), (2, 2))
    assert next_device(shards, [0, 0, 0, 0], [4, 4, 4, 4]) == 1
    assert next_device(shards, [0, 2, 0, 0], [4, 4, 4, 4]) == 2
    assert next_device(shards, [0, 1, 0, 0], [4, 0, 4, 4]) == 2  # device 1 filled by others
    assert next_device(shards, [0, 2, 2, 0], [1, 4, 4, 3]) == 1  # plan used up: emptiest (tie: lowest id)
    with pytest.raises(ValueError, match="no ESP device has a free KV page"):
        next_device(shards, [0, 0, 0], [0, 0, 0])


def test_zigzag_staging_balances_causal_work():
    group = (5, 6, 7)
    assert zigzag_assignment(6, group) == [5, 6, 7, 7, 6, 5]
    assert zigzag_assignment(12, group) == [5, 5, 6, 6, 7, 7, 7, 7, 6, 6, 5, 5]
    owner = zigzag_assignment(37, tuple(range(8)))  # not a multiple of 2k
    work = np.zeros(8)
    for page, d in enumerate(owner):  # a staged page's keys are seen by every later query
        work[d] += 37 - page
    assert set(owner) == set(range(8)) and work.max() / work.min() < 1.6
    assert prefill_group(3, (4, 1), 6) == (4, 1, 0)


def plan(rows, block_size=4) -> BatchPlan:
    """``rows``: ``(request id, computed, new, table)``."""
    return BatchPlan(
        request_ids=tuple(r[0] for r in rows),
        num_computed_tokens=np.array([r[1] for r in rows], np.int64),
        num_new_tokens=np.array([r[2] for r in rows], np.int64),
        samples_token=np.ones(len(rows), bool),
        block_tables=tuple(tuple(r[3]) for r in rows),
        token_ids=np.zeros(sum(r[2] for r in rows), np.int32),
        block_size=block_size,
    )


def test_pages_bind_on_first_write_stage_over_k_devices_and_come_back():
    pages = EspPages(num_devices=4, pages_per_device=4, stage_pages=4, page_size=4, policy=EspPolicy())
    pages.register("long", prompt_len=22, max_total_tokens=26)  # 7 pages: devices 0 (4) and 1 (3)
    pages.set_prefill_degree("long", 4)
    pages.register("short", prompt_len=3, max_total_tokens=6)
    [long_rows, short_rows] = pages.prepare(plan([("long", 0, 22, range(6)), ("short", 0, 3, (9, 10))]))
    assert long_rows.dest_dev.tolist() == [0, 0, 0, 0, 1, 1] and short_rows.dest_dev.tolist() == [2]
    assert pages.decode_devices("long") == (0, 1)
    staged = long_rows.stage_dev.tolist()  # zig-zag over (0, 1, 2, 3); a page already on its device is not staged
    assert staged == [-1, 1, 2, 3, 3, 2] and set(long_rows.stage_page[long_rows.stage_dev >= 0]) >= {4}
    assert pages.free_pages() == [0, 2, 3, 4]
    pages.check_invariants()
    # the decode's page 6 goes to device 1 (planned); unplanned pages scale up
    [rows] = pages.prepare(plan([("long", 24, 1, range(7))]))
    assert rows.dest_dev.tolist() == [0, 0, 0, 0, 1, 1, 1] and (rows.stage_dev == -1).all()
    pages.release("long")
    assert pages.free_pages() == [4, 4, 3, 4] and pages.shards_of("short") == [(2, 0, 4)]
    with pytest.raises(ValueError, match="KV block 0 holds no KV"):
        pages.prepare(plan([("short", 8, 1, (9, 0, 10))]))  # block 0 claimed as computed, never written


def test_copy_on_write_drops_the_replaced_page():
    pages = EspPages(num_devices=2, pages_per_device=2, stage_pages=0, page_size=4, policy=EspPolicy())
    pages.register("a", 6, 8)
    pages.prepare(plan([("a", 0, 6, (0, 1))]))
    pages.bind_anywhere(3, near=pages.where(1)[0])  # the executor binds a copy's destination
    pages.prepare(plan([("a", 6, 1, (0, 3))]))
    assert 1 not in pages.binding and pages.free_pages() == [1, 1]  # device 0 was full: the copy went to 1
    pages.check_invariants()
