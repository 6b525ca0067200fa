"""StepGeometry.work: the work of a step recomputed from its rows equals what ``pack`` lays out and
what the grouped attention loop visits (the profiled cost model's features rest on this)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.runtime.step_geometry import StepGeometry, bucket
from jaxserve.engine.packing import PackSpec, RequestSampling, pack
from jaxserve.plan import BatchPlan

PAGE, CHUNK_PAGES = 4, 2
rows_strategy = st.lists(
    st.tuples(st.integers(0, 60), st.one_of(st.just(1), st.integers(2, 40))), min_size=1, max_size=12
)


def plan_of(rows) -> BatchPlan:
    """rows: ``(num_computed, num_new)``; disjoint block tables from a bump allocator."""
    tables, nxt = [], 0
    for c, n in rows:
        k = -(-(c + n) // PAGE)
        tables.append(tuple(range(nxt, nxt + k)))
        nxt += k
    return BatchPlan(
        request_ids=tuple(f"r{i}" for i in range(len(rows))),
        num_computed_tokens=np.array([c for c, _ in rows], np.int64),
        num_new_tokens=np.array([n for _, n in rows], np.int64),
        samples_token=np.ones(len(rows), bool),
        block_tables=tuple(tables),
        token_ids=np.zeros(sum(n for _, n in rows), np.int32),
        block_size=PAGE,
    )


@settings(max_examples=150, deadline=None)
@given(rows=rows_strategy, per_octave=st.sampled_from([(1, 1), (2, 4)]), block_rows=st.sampled_from([4, 8]))
def test_work_matches_the_packed_step(rows, per_octave, block_rows):
    plan = plan_of(rows)
    spec = PackSpec(num_pages=10_000, page_size=PAGE, pages_per_seq=64, block_rows=block_rows,
                    decode_per_octave=per_octave[0], blocks_per_octave=per_octave[1])  # fmt: skip
    sampling = {rid: RequestSampling(1, 0.0, 0, 1.0, 0) for rid in plan.request_ids}
    hb = pack(plan, spec, sampling)
    n, c = plan.num_new_tokens, plan.num_computed_tokens
    dec = n == 1
    chunk = CHUNK_PAGES * PAGE
    grouped = spec.geometry("grouped", CHUNK_PAGES).work(n[~dec], c[~dec], c[dec])
    rows_, slots, dec_keys, dec_read, pre_keys, pre_read, seqs = grouped
    assert rows_ == len(hb.token_ids) and slots == len(hb.logits_rows) and seqs == len(rows)
    # The grouped loop runs ceil(max kv / chunk) chunks over all rows of its group; each row (and
    # each block) reads only its own sequence's KV.
    a = hb.attn
    visited = lambda kv: -(-int(kv.max()) // chunk) * chunk if len(kv) else 0  # noqa: E731
    assert dec_keys == a.num_decode_rows * visited(a.decode_kv_lens)
    assert pre_keys == a.num_blocks * block_rows * visited(a.block_kv_lens)
    assert dec_read == a.decode_kv_lens.sum() and pre_read == a.block_kv_lens.sum()
    ragged = spec.geometry("ragged", CHUNK_PAGES).work(n[~dec], c[~dec], c[dec])
    assert ragged[:2] == grouped[:2] and ragged[3] == dec_read and ragged[5] == pre_read and ragged[6] == seqs
    assert ragged[2] == dec_read  # the ragged kernel computes the keys it reads
    assert ragged[4] == pytest.approx(float((n[~dec] * (c[~dec] + (n[~dec] + 1) / 2)).sum()))


@pytest.mark.parametrize("attention", ["grouped", "ragged"])
def test_decode_work_is_work_step_by_step(attention):
    geometry = StepGeometry(attention=attention, page_size=16, chunk_pages=2)
    context = np.array([5, 31, 32, 33, 100, 7, 64])
    terms = geometry.decode_work(len(context), int(context.sum()), int(context.max()), 80)
    for j in range(80):
        step = geometry.work([], [], context + j)
        assert tuple(float(np.broadcast_to(t, 80)[j]) for t in terms) == step


def test_geometry_validates_its_fields():
    with pytest.raises(ValueError, match="attention must be one of"):
        StepGeometry(attention="flash")
    with pytest.raises(ValueError, match="block_rows must be an int >= 1"):
        StepGeometry(block_rows=0)
    assert StepGeometry().shape(5, 9) == (bucket(5, 1, 2), bucket(9, 1, 4)) == (6, 10)
