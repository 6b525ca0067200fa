"""packing.pack: BatchPlan -> bucketed host arrays of one jitted step (no model, no compilation
except the two attention layouts checked against a direct computation at the end)."""

from __future__ import annotations

import numpy as np
import pytest
from plan_testing import make_plan as plan_for_rows

from jaxserve.runtime.step_geometry import bucket, bucket_sizes
from jaxserve.engine.packing import PackSpec, RequestSampling, pack
from jaxserve.plan import BatchPlan

NUM_PAGES, PAGE, WIDTH, B = 20, 4, 8, 8
# Power-of-two buckets here, so the layout tests see padding decode rows and padding blocks.
SPEC = PackSpec(
    num_pages=NUM_PAGES, page_size=PAGE, pages_per_seq=WIDTH, block_rows=B, decode_per_octave=1, blocks_per_octave=1
)


def make_plan(rows, block_size=PAGE) -> BatchPlan:
    """rows: ``(request_id, num_computed, token_ids, block_table, samples_token)``."""
    return plan_for_rows(rows, block_size)


# A mixed step: decodes, a prefill chunk starting mid-sequence, a prompt's first chunk spanning two
# row blocks (not sampling), and a one-token prompt chunk (laid out as a decode row, not sampling).
ROWS = [
    ("dec_a", 9, [11], (3, 7, 1), True),
    ("pre_b", 5, [21, 22, 23, 24, 25, 26, 27], (2, 5, 8), True),
    ("dec_c", 14, [31], (4, 6, 9, 10), True),
    ("pre_d", 0, list(range(41, 51)), (11, 12, 13), False),
    ("one_e", 3, [51], (14,), False),
]
SAMPLING = {  # only the rows that sample need parameters
    "dec_a": RequestSampling(prompt_len=5, temperature=0.7, top_k=3, top_p=0.9, seed=11),
    "pre_b": RequestSampling(prompt_len=12, temperature=0.0, top_k=0, top_p=1.0, seed=12),
    "dec_c": RequestSampling(prompt_len=10, temperature=1.5, top_k=0, top_p=0.5, seed=2**32 - 1),
}


@pytest.fixture(scope="module")
def mixed():
    plan = make_plan(ROWS)
    return plan, pack(plan, SPEC, SAMPLING)


def test_mixed_plan_shape_and_dtypes(mixed):
    _, hb = mixed
    # 3 one-token rows -> 4 decode rows; prefill blocks 1 (pre_b) + 2 (pre_d) = 3 -> 4.
    assert hb.shape_key == (4, 4)
    T, S = 4 + 4 * B, 4 + 4
    assert hb.token_ids.shape == (T,) and hb.attn.positions.shape == (T,)
    assert hb.attn.slot_page.shape == hb.attn.slot_offset.shape == (T,)
    assert hb.logits_rows.shape == (S,)
    assert hb.attn.decode_pages.shape == (4, WIDTH) and hb.attn.block_pages.shape == (4, WIDTH)
    assert hb.attn.page_indices.shape == (S, WIDTH) and hb.attn.cu_q_lens.shape == (S + 1,)
    for name, a in hb.attn._asdict().items():
        assert a.dtype == np.int32, name
    assert hb.token_ids.dtype == np.int32 and hb.logits_rows.dtype == np.int32
    assert [a.dtype for a in hb.sampling] == [np.float32, np.int32, np.float32, np.uint32, np.int32]


def test_mixed_plan_rows(mixed):
    plan, hb = mixed
    a = hb.attn
    pad = NUM_PAGES
    # Decode rows first (plan order), then each prefill chunk from a block boundary.
    assert hb.first_rows.tolist() == [0, 4, 1, 12, 2]
    exp_tokens = [11, 31, 51, 0] + [21, 22, 23, 24, 25, 26, 27, 0] + list(range(41, 51)) + [0] * 14
    assert hb.token_ids.tolist() == exp_tokens
    exp_pos = [9, 14, 3, 0] + [5, 6, 7, 8, 9, 10, 11, 0] + list(range(10)) + [0] * 14
    assert a.positions.tolist() == exp_pos
    # Each real row writes its own position's slot: table[pos // 4], pos % 4; padding -> page 20.
    exp_page = [1, 10, 14, pad] + [5, 5, 5, 8, 8, 8, 8, pad] + [11] * 4 + [12] * 4 + [13] * 2 + [pad] * 14
    assert a.slot_page.tolist() == exp_page
    exp_off = [1, 2, 3, 0] + [1, 2, 3, 0, 1, 2, 3, 0] + [0, 1, 2, 3] * 2 + [0, 1] + [0] * 14
    assert a.slot_offset.tolist() == exp_off
    # Every padding row drops its write; every real row writes a distinct (page, offset).
    real = a.slot_page != pad
    assert real.sum() == plan.num_tokens
    slots = set(zip(a.slot_page[real].tolist(), a.slot_offset[real].tolist()))
    assert len(slots) == plan.num_tokens


def test_mixed_plan_logits_rows_and_sampling(mixed):
    _, hb = mixed
    # Slot order: decodes a, c, e, padding; prefill b at block 0 (slot 4), d at blocks 1-2 (slot 5),
    # slot 6 unused, the padding block 3 is slot 7. Each real slot points at its last row.
    assert hb.logits_rows.tolist() == [0, 1, 2, 0, 10, 21, 0, 0]
    assert dict(hb.sampled) == {"dec_a": 0, "dec_c": 1, "pre_b": 4}
    s = hb.sampling
    np.testing.assert_allclose(s.temperature, [0.7, 1.5, 0, 0, 0.0, 0, 0, 0])
    assert s.top_k.tolist() == [3, 0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(s.top_p, [0.9, 0.5, 1, 1, 1, 1, 1, 1])
    assert s.seed.tolist() == [11, 2**32 - 1, 0, 0, 12, 0, 0, 0]
    # Index of the token being sampled: tokens in KV after the step minus the prompt length.
    assert s.index.tolist() == [10 - 5, 15 - 10, 0, 0, 12 - 12, 0, 0, 0]


def test_mixed_plan_attention_metadata(mixed):
    plan, hb = mixed
    a = hb.attn
    tables = {rid: list(t) + [0] * (WIDTH - len(t)) for rid, t in zip(plan.request_ids, plan.block_tables)}
    zero = [0] * WIDTH
    assert a.decode_kv_lens.tolist() == [10, 15, 4, 0]
    assert a.decode_pages.tolist() == [tables["dec_a"], tables["dec_c"], tables["one_e"], zero]
    assert a.block_kv_lens.tolist() == [12, 10, 10, 0]
    assert a.block_pages.tolist() == [tables["pre_b"], tables["pre_d"], tables["pre_d"], zero]
    # Ragged layout: every decode slot (padding too) has one query row, a prefill slot its padded
    # blocks, the unused slot none, the padding block B rows.
    q_lens = [1, 1, 1, 1, B, 2 * B, 0, B]
    assert a.cu_q_lens.tolist() == np.concatenate([[0], np.cumsum(q_lens)]).tolist()
    assert a.cu_q_lens[-1] == len(hb.token_ids)
    assert a.num_seqs.tolist() == [8]
    # A prefill slot's KV length counts its padded query rows (they sit after the real ones).
    assert a.kv_lens.tolist() == [10, 15, 4, 1, 12 - 7 + B, 10 - 10 + 2 * B, 0, B]
    assert a.page_indices.tolist() == [
        tables["dec_a"], tables["dec_c"], tables["one_e"], zero, tables["pre_b"], tables["pre_d"], zero, zero
    ]
    # Consistency: each plan row's real query rows lie inside its slot's ragged range, are the last
    # rows before its padding, and the slot's ragged position of row j is the row's position.
    cu = a.cu_q_lens.tolist()
    for i, slot in enumerate([0, 4, 1, 5, 2]):
        first, n = int(hb.first_rows[i]), int(plan.num_new_tokens[i])
        assert cu[slot] == first and first + n <= cu[slot + 1]
        q_len = cu[slot + 1] - cu[slot]
        for j in range(q_len):
            ragged_pos = a.kv_lens[slot] - q_len + j
            if j < n:
                assert ragged_pos == a.positions[first + j]


@pytest.mark.parametrize("num_decodes", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("chunks", [(), (3,), (8, 1 + 8), (2, 17, 5)])
def test_bucketed_shapes(num_decodes, chunks):
    rows, page = [], 0
    for k in range(num_decodes):
        rows.append((f"d{k}", 2, [5], (page,), True))
        page += 1
    for k, n in enumerate(chunks):
        pages = tuple(range(page, page + -(-(n + 1) // PAGE)))
        page += len(pages)
        rows.append((f"p{k}", 1, list(range(n)), pages, k % 2 == 0))
    if not rows:
        return
    plan = make_plan(rows)
    sampling = {r[0]: RequestSampling(1, 0.0, 0, 1.0, 0) for r in rows}
    hb = pack(plan, PackSpec(num_pages=64, page_size=PAGE, pages_per_seq=WIDTH, block_rows=B), sampling)
    blocks = sum(-(-n // B) for n in chunks)
    D, NB = hb.shape_key
    assert (D, NB) == (bucket(num_decodes, 1, 2), bucket(blocks, 1, 4))
    assert D >= num_decodes and NB >= blocks
    assert len(hb.token_ids) == D + NB * B and len(hb.logits_rows) == D + NB
    # Every row's last token is where its slot's logits come from.
    for i, (rid, c, toks, _, _) in enumerate(rows):
        last = int(hb.first_rows[i]) + len(toks) - 1
        assert hb.token_ids[last] == toks[-1] and hb.attn.positions[last] == c + len(toks) - 1
        assert last in hb.logits_rows.tolist()


def test_bucket():
    assert [bucket(n) for n in range(0, 10)] == [0, 1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert bucket(3, minimum=8) == 8 and bucket(0, minimum=8) == 0
    assert [bucket(n, 1, 2) for n in range(0, 14)] == [0, 1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert [bucket(n, 1, 4) for n in (9, 11, 17, 263, 384, 385)] == [10, 12, 20, 320, 384, 448]


@pytest.mark.parametrize("per_octave", [1, 2, 4])
def test_padding_is_bounded_and_bucket_sizes_enumerate_every_bucket(per_octave):
    sizes = bucket_sizes(700, 1, per_octave)
    assert sizes == sorted(set(bucket(n, 1, per_octave) for n in range(0, 701)))
    for n in range(1, 701):  # at most 1 / (per_octave + 1) of the rows are padding
        assert (bucket(n, 1, per_octave) - n) * (per_octave + 1) < bucket(n, 1, per_octave) + per_octave


def test_forced_shape_and_empty_plan():
    plan = make_plan(ROWS)
    hb = pack(plan, SPEC, SAMPLING, shape=(8, 8))
    assert hb.shape_key == (8, 8) and len(hb.token_ids) == 8 + 8 * B
    assert dict(hb.sampled) == {"dec_a": 0, "dec_c": 1, "pre_b": 8}  # prefill slots start at D = 8
    empty = pack(BatchPlan.empty(PAGE), SPEC, {}, shape=(2, 1))
    assert empty.shape_key == (2, 1) and empty.sampled == ()
    assert (empty.attn.slot_page == NUM_PAGES).all()  # warm-up steps write nothing
    assert not empty.attn.decode_kv_lens.any() and not empty.attn.block_kv_lens.any()


def test_block_table_wider_than_pages_per_seq_names_the_request():
    rows = [("ok", 0, [1, 2], (0,), True), ("too_long", 30, [7], tuple(range(1, 10)), True)]
    plan = make_plan(rows)
    sampling = {r[0]: RequestSampling(2, 0.0, 0, 1.0, 0) for r in rows}
    with pytest.raises(ValueError, match="'too_long'.*9 KV pages.*pages_per_seq=8"):
        pack(plan, SPEC, sampling)
    # Exactly pages_per_seq pages is fine.
    pack(make_plan([("fits", 28, [7], tuple(range(1, 9)), True)]), SPEC, {"fits": RequestSampling(2, 0.0, 0, 1.0, 0)})


@pytest.mark.parametrize("window", [None, 5])
def test_both_attention_layouts_match_direct_attention(mixed, window):
    """The grouped (CPU) and ragged (kernel) layouts of the mixed step give every real row the
    attention over its own request's positions 0..pos, read through the block table."""
    import jax

    from jaxserve.model.attention import attend_grouped, attend_ragged

    plan, hb = mixed
    Hq, Hkv, D = 4, 2, 8
    rng = np.random.default_rng(0)
    k_pages = rng.standard_normal((Hkv, NUM_PAGES, PAGE, D)).astype(np.float32)
    v_pages = rng.standard_normal((Hkv, NUM_PAGES, PAGE, D)).astype(np.float32)
    q = rng.standard_normal((len(hb.token_ids), Hq, D)).astype(np.float32)
    kw = dict(sm_scale=D**-0.5, sliding_window=window)
    grouped = np.asarray(jax.jit(lambda q, c, b: attend_grouped(q, c, b, chunk_pages=2, **kw))(q, (k_pages, v_pages), hb.attn))
    ragged = np.asarray(jax.jit(lambda q, c, b: attend_ragged(q, c, b, **kw))(q, (k_pages, v_pages), hb.attn))
    for i, (rid, c, n, table) in enumerate(
        zip(plan.request_ids, plan.num_computed_tokens.tolist(), plan.num_new_tokens.tolist(), plan.block_tables)
    ):
        for j in range(n):
            row, pos = int(hb.first_rows[i]) + j, c + j
            ks = np.array([k_pages[:, table[t // PAGE], t % PAGE] for t in range(pos + 1)])  # [pos+1, Hkv, D]
            vs = np.array([v_pages[:, table[t // PAGE], t % PAGE] for t in range(pos + 1)])
            lo = 0 if window is None else max(0, pos - window + 1)
            ks, vs = ks[lo:], vs[lo:]
            expect = np.zeros((Hq, D), np.float32)
            for h in range(Hq):
                s = ks[:, h // (Hq // Hkv)] @ q[row, h] * D**-0.5
                p = np.exp(s - s.max())
                expect[h] = (p / p.sum()) @ vs[:, h // (Hq // Hkv)]
            np.testing.assert_allclose(grouped[row], expect, atol=2e-5, err_msg=f"grouped {rid} pos {pos}")
            np.testing.assert_allclose(ragged[row], expect, atol=2e-5, err_msg=f"ragged {rid} pos {pos}")
