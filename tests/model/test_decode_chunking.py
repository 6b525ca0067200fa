"""The CPU attention path's decode rows may loop over smaller page chunks than its prefill blocks
(``attention.DECODE_CHUNK_PAGES``): every real row still gets exact attention over its own request's
positions, equal to the single-chunk-size path within float32 rounding, for mixed prefill + decode
steps, every GQA ratio, contexts ending on, just before and just after page boundaries."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from plan_testing import make_plan

from jaxserve.engine.packing import PackSpec, RequestSampling, pack
from jaxserve.model.attention import attend_grouped
from jaxserve.plan import BatchPlan

PAGE, WIDTH, NUM_PAGES, D = 4, 8, 40, 8
SPEC = PackSpec(num_pages=NUM_PAGES, page_size=PAGE, pages_per_seq=WIDTH, block_rows=4)
CHUNK_PAGES = 4  # the prefill chunk; WIDTH is a multiple of it, as the runner makes it


def mixed_plan() -> BatchPlan:
    """Decodes whose contexts (after this step) are 1, 4, 5, 7, 8, 9, 13 and 32 tokens -- inside the
    first page, ending on a page, just past one, the full page table -- and two prefill chunks."""
    rng = np.random.default_rng(1)
    pages = iter(rng.permutation(NUM_PAGES).tolist())
    rows = []
    for i, ctx in enumerate([1, 4, 5, 7, 8, 9, 13, 32]):
        rows.append((f"dec{i}", ctx - 1, [7], [next(pages) for _ in range(-(-ctx // PAGE))], True))
    rows.append(("pre_mid", 6, list(range(10, 17)), [next(pages) for _ in range(4)], True))
    rows.append(("pre_new", 0, list(range(20, 25)), [next(pages) for _ in range(2)], False))
    return make_plan(rows, PAGE)


def direct(q_row, pos, table, k_pages, v_pages, window):
    """Attention of one row ``q_row [Hq, D]`` at ``pos`` over its table's positions, in float64."""
    Hq, Hkv = q_row.shape[0], k_pages.shape[0]
    lo = 0 if window is None else max(0, pos - window + 1)
    ks = np.array([k_pages[:, table[t // PAGE], t % PAGE] for t in range(lo, pos + 1)], np.float64)
    vs = np.array([v_pages[:, table[t // PAGE], t % PAGE] for t in range(lo, pos + 1)], np.float64)
    out = np.zeros((Hq, D))
    for h in range(Hq):
        s = ks[:, h // (Hq // Hkv)] @ q_row[h] * D**-0.5
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ vs[:, h // (Hq // Hkv)]
    return out


@pytest.mark.parametrize("Hq, Hkv, window", [(4, 4, None), (4, 2, 6), (6, 2, None), (8, 1, 6)])
def test_decode_chunks_match_direct_attention_and_the_single_chunk_path(Hq, Hkv, window):
    """Decode chunks of 1, 2, 3 pages (3 does not divide the page table: the path takes gcd(3,
    chunk_pages) = 1) and the default (``None``: ``DECODE_CHUNK_PAGES``) against a float64 computation and against
    one chunk size, ``chunk_pages``, for every row (the path before)."""
    plan = mixed_plan()
    hb = pack(plan, SPEC, {rid: RequestSampling(2, 0.0, 0, 1.0, 0) for rid in plan.request_ids})
    assert hb.attn.num_decode_rows >= 8 and hb.attn.num_blocks >= 3  # both parts of the step run
    rng = np.random.default_rng(Hq * 10 + Hkv)
    k_pages = rng.standard_normal((Hkv, NUM_PAGES, PAGE, D)).astype(np.float32)
    v_pages = rng.standard_normal((Hkv, NUM_PAGES, PAGE, D)).astype(np.float32)
    q = rng.standard_normal((len(hb.token_ids), Hq, D)).astype(np.float32)
    kw = dict(sm_scale=D**-0.5, sliding_window=window, chunk_pages=CHUNK_PAGES)
    run = jax.jit(lambda q, c, b, dc: attend_grouped(q, c, b, decode_chunk_pages=dc, **kw), static_argnums=3)
    old = np.asarray(run(q, (k_pages, v_pages), hb.attn, CHUNK_PAGES))
    for decode_chunk_pages in (1, 2, 3, None):
        new = np.asarray(run(q, (k_pages, v_pages), hb.attn, decode_chunk_pages))
        for i, (rid, c, n, table) in enumerate(
            zip(plan.request_ids, plan.num_computed_tokens.tolist(), plan.num_new_tokens.tolist(), plan.block_tables)
        ):
            for j in range(n):
                row, pos = int(hb.first_rows[i]) + j, c + j
                expect = direct(q[row], pos, table, k_pages, v_pages, window)
                msg = f"{rid} pos {pos} decode_chunk_pages {decode_chunk_pages}"
                np.testing.assert_allclose(new[row], expect, atol=2e-6, err_msg=msg)
                np.testing.assert_allclose(new[row], old[row], atol=1e-6, err_msg=msg)

