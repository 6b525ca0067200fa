"""BatchPlan (derived ragged arrays, validate, immutability) and StepOutput."""

import dataclasses
import math

import immutables
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxserve.plan import BatchPlan, ScheduledRequest, StepOutput

BS = 4


def make_plan(rows, block_size=BS, token_ids=None, **ops):
    """rows: (request_id, num_computed, num_new, samples_token, block_table)."""
    rids = tuple(r[0] for r in rows)
    computed = np.array([r[1] for r in rows], np.int64)
    new = np.array([r[2] for r in rows], np.int64)
    samples = np.array([r[3] for r in rows], bool)
    tables = tuple(tuple(r[4]) for r in rows)
    if token_ids is None:
        token_ids = np.arange(1, int(new.sum()) + 1, dtype=np.int32) if rows else np.zeros(0, np.int32)
    return BatchPlan(rids, computed, new, samples, tables, np.asarray(token_ids, np.int32), block_size, **ops)


GOOD_ROWS = [
    ("prefill", 0, 5, False, (7, 8)),  # a non-final prefill chunk: 5 tokens, no sample
    ("decode", 6, 1, True, (1, 2)),  # kv_len 7 in 2 blocks of 4
    ("lastchunk", 4, 3, True, (3, 4)),  # final prefill chunk: samples
    ("one", 0, 1, False, (9,)),  # a 1-token non-sampling chunk is not a decode
]


def test_derived_arrays_on_a_known_plan():
    p = make_plan(GOOD_ROWS)
    p.validate()
    assert p.num_seqs == 4 and not p.is_empty
    assert p.num_tokens == 10
    assert p.cu_q_lens.tolist() == [0, 5, 6, 9, 10]
    assert p.cu_q_lens.dtype == np.int32
    assert p.kv_lens.tolist() == [5, 7, 7, 1]
    assert p.kv_lens.dtype == np.int32
    assert p.page_indices.dtype == np.int32
    assert p.page_indices.tolist() == [[7, 8], [1, 2], [3, 4], [9, 0]]
    assert p.is_decode.tolist() == [False, True, False, False]
    assert p.num_decode_tokens == 1
    assert p.num_prefill_tokens == 9
    e = p.entries
    assert e[0] == ScheduledRequest("prefill", 0, 5, (7, 8), (1, 2, 3, 4, 5), False)
    assert e[1] == ScheduledRequest("decode", 6, 1, (1, 2), (6,), True)
    assert e[2] == ScheduledRequest("lastchunk", 4, 3, (3, 4), (7, 8, 9), True)
    assert e[3] == ScheduledRequest("one", 0, 1, (9,), (10,), False)
    for x in e:
        assert all(type(v) is int for v in x.token_ids)
        assert type(x.num_computed_tokens) is int and type(x.num_new_tokens) is int
        assert type(x.samples_token) is bool


def test_page_indices_pads_ragged_tables_with_zero():
    p = make_plan([("a", 0, 1, True, (5,)), ("b", 0, 9, True, (10, 11, 12)), ("c", 0, 2, True, (3,))])
    assert p.page_indices.shape == (3, 3)
    assert p.page_indices.tolist() == [[5, 0, 0], [10, 11, 12], [3, 0, 0]]


row_strategy = st.tuples(
    st.integers(0, 100),  # num_computed
    st.integers(1, 20),  # num_new
    st.booleans(),  # samples_token
    st.integers(0, 3),  # extra blocks beyond what is needed
)


@st.composite
def plans(draw):
    specs = draw(st.lists(row_strategy, max_size=12))
    bs = draw(st.integers(1, 8))
    rows, next_block = [], 0
    for i, (nc, nn, s, extra) in enumerate(specs):
        nblocks = -(-(nc + nn) // bs) + extra
        rows.append((f"r{i}", nc, nn, s, tuple(range(next_block, next_block + nblocks))))
        next_block += nblocks
    total = sum(r[2] for r in rows)
    toks = draw(st.lists(st.integers(0, 2**31 - 1), min_size=total, max_size=total))
    return rows, bs, toks


@given(plans())
@settings(max_examples=150, deadline=None)
def test_derived_arrays_match_rows(spec):
    rows, bs, toks = spec
    p = make_plan(rows, block_size=bs, token_ids=toks)
    p.validate()
    n = len(rows)
    new = [r[2] for r in rows]
    assert p.num_seqs == n and p.is_empty == (n == 0)
    assert p.num_tokens == sum(new)
    assert p.cu_q_lens.tolist() == [sum(new[:i]) for i in range(n + 1)]
    assert p.kv_lens.tolist() == [r[1] + r[2] for r in rows]
    width = max((len(r[4]) for r in rows), default=0)
    assert p.page_indices.shape == (n, width)
    for i, r in enumerate(rows):
        assert p.page_indices[i, : len(r[4])].tolist() == list(r[4])
        assert not p.page_indices[i, len(r[4]):].any()
    is_dec = [r[2] == 1 and r[3] for r in rows]
    assert p.is_decode.tolist() == is_dec
    assert p.num_decode_tokens == sum(is_dec)
    assert p.num_prefill_tokens == sum(new) - sum(is_dec)
    assert p.num_prefill_tokens + p.num_decode_tokens == p.num_tokens
    # entries give the rows back, with each row's slice of the flat token ids
    off = 0
    assert len(p.entries) == n
    for e, r in zip(p.entries, rows):
        assert e == ScheduledRequest(r[0], r[1], r[2], r[4], tuple(toks[off : off + r[2]]), r[3])
        off += r[2]
    # and a plan rebuilt from its entries has the same arrays
    q = make_plan(
        [(e.request_id, e.num_computed_tokens, e.num_new_tokens, e.samples_token, e.block_ids) for e in p.entries],
        block_size=bs,
        token_ids=[t for e in p.entries for t in e.token_ids],
    )
    for name in ("num_computed_tokens", "num_new_tokens", "samples_token", "token_ids", "cu_q_lens", "kv_lens",
                 "page_indices"):
        np.testing.assert_array_equal(getattr(q, name), getattr(p, name))
    assert q.request_ids == p.request_ids and q.block_tables == p.block_tables


# -- validate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,kw,match",
    [
        ([("a", 0, 0, True, (1,))], {}, "at least one token"),
        ([("a", 0, 2, True, (1,)), ("b", 3, -1, True, (2,))], {}, "at least one token"),
        ([("a", -1, 2, True, (1,))], {}, "negative num_computed_tokens"),
        ([("a", 0, 2, True, (1,))], {"token_ids": [1, 2, 3]}, "3 token ids for 2 tokens"),
        ([("a", 0, 2, True, (1,))], {"token_ids": [1]}, "1 token ids for 2 tokens"),
        ([("a", 0, 2, True, (1,)), ("a", 2, 1, True, (1,))], {}, "appears twice"),
        ([("a", 0, 5, True, (1,))], {}, "'a' has 1 blocks for 5 tokens"),
        ([("a", 4, 1, True, ())], {}, "'a' has 0 blocks for 5 tokens"),
        ([("ok", 0, 1, True, (2,)), ("b", 7, 2, True, (3, 4))], {}, "'b' has 2 blocks for 9 tokens"),
        ([("a", 0, 1, True, (1,))], {"preempted": ("a",)}, "preempted or swapped-out"),
        ([("a", 0, 1, True, (1,))], {"swapped_out": ("x", "a")}, "preempted or swapped-out"),
    ],
)
def test_validate_rejects_bad_plans(rows, kw, match):
    p = make_plan(rows, **kw)  # construction itself succeeds: validate is the full check
    with pytest.raises(ValueError, match=match):
        p.validate()


def test_validate_accepts_exact_block_fit_and_ops():
    p = make_plan(
        [("a", 4, 4, True, (1, 2)), ("b", 0, 1, True, (3,))],
        preempted=("c",),
        swapped_out=("d",),
        swapped_in=("b",),
        copy_blocks=((5, 6),),
        swap_out_blocks=((7, 0),),
        swap_in_blocks=((1, 8),),
        step=12,
    )
    p.validate()
    assert (p.preempted, p.swapped_out, p.swapped_in, p.step) == (("c",), ("d",), ("b",), 12)
    assert p.copy_blocks == ((5, 6),) and p.swap_out_blocks == ((7, 0),) and p.swap_in_blocks == ((1, 8),)
    # one more token than the table holds is caught
    with pytest.raises(ValueError, match="blocks for 9 tokens"):
        make_plan([("a", 4, 5, True, (1, 2))]).validate()


@pytest.mark.parametrize("field", ["num_computed_tokens", "num_new_tokens", "samples_token", "block_tables"])
def test_construction_rejects_row_count_mismatch(field):
    args = dict(
        request_ids=("a", "b"),
        num_computed_tokens=np.array([0, 0], np.int64),
        num_new_tokens=np.array([1, 1], np.int64),
        samples_token=np.array([True, True]),
        block_tables=((1,), (2,)),
        token_ids=np.array([1, 2], np.int32),
        block_size=4,
    )
    v = args[field]
    args[field] = v[:1]
    with pytest.raises(ValueError, match=rf"BatchPlan\.{field} has 1 rows, expected 2"):
        BatchPlan(**args)


# -- immutability -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["num_computed_tokens", "num_new_tokens", "samples_token", "token_ids", "cu_q_lens", "kv_lens", "page_indices",
     "is_decode"],
)
def test_arrays_are_read_only(name):
    p = make_plan(GOOD_ROWS)
    a = getattr(p, name)
    before = a.copy()
    assert not a.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        a[0] = a[0] + 1 if a.dtype != bool else not a[0]
    np.testing.assert_array_equal(getattr(p, name), before)


def test_derived_values_are_consistent_after_repeated_access():
    p = make_plan(GOOD_ROWS)
    assert p.cu_q_lens is p.cu_q_lens  # cached, not recomputed
    assert p.entries is p.entries
    assert p.num_tokens == 10 and p.num_tokens == 10


def test_plan_is_frozen():
    p = make_plan(GOOD_ROWS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.step = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.request_ids = ()
    assert p.step == 0 and p.num_seqs == 4


# -- empty ------------------------------------------------------------------------------------


def test_empty_plan():
    p = BatchPlan.empty(16, step=3, preempted=("x",), copy_blocks=((1, 2),))
    p.validate()
    assert p.is_empty and p.num_seqs == 0 and p.num_tokens == 0
    assert p.block_size == 16 and p.step == 3
    assert p.preempted == ("x",) and p.copy_blocks == ((1, 2),)
    assert p.cu_q_lens.tolist() == [0] and p.cu_q_lens.dtype == np.int32
    assert p.kv_lens.shape == (0,)
    assert p.page_indices.shape == (0, 0)
    assert p.is_decode.shape == (0,)
    assert p.num_decode_tokens == 0 and p.num_prefill_tokens == 0
    assert p.entries == ()
    assert p.token_ids.shape == (0,)
    for name in ("num_computed_tokens", "num_new_tokens", "samples_token", "token_ids"):
        assert not getattr(p, name).flags.writeable
    q = BatchPlan.empty(8)
    assert q.step == 0 and q.preempted == () and q.copy_blocks == () and q.block_size == 8


# -- StepOutput -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"token_ids": [1, 2]}, "token_ids"),
        ({"token_ids": None}, "token_ids"),
        ({"token_ids": (("a", 1),)}, "token_ids"),
        ({"token_ids": {}, "duration_s": -0.5}, "duration_s"),
        ({"token_ids": {}, "duration_s": math.nan}, "duration_s"),
        ({"token_ids": {}, "duration_s": math.inf}, "duration_s"),
        ({"token_ids": {}, "duration_s": "1"}, "duration_s"),
        ({"token_ids": {}, "duration_s": None}, "duration_s"),
        ({"token_ids": {}, "energy_j": -1}, "energy_j"),
        ({"token_ids": {}, "energy_j": math.nan}, "energy_j"),
        ({"token_ids": {}, "energy_j": -math.inf}, "energy_j"),
        ({"token_ids": {}, "energy_j": "0"}, "energy_j"),
    ],
)
def test_step_output_rejects_bad_field(kw, field):
    with pytest.raises(ValueError, match=rf"StepOutput\.{field}\b"):
        StepOutput(**kw)


def test_step_output_valid():
    o = StepOutput({"a": 3, "b": 0})
    assert dict(o.token_ids) == {"a": 3, "b": 0} and o.duration_s == 0.0 and o.energy_j == 0.0
    o = StepOutput(immutables.Map(a=1), duration_s=0.25, energy_j=3)
    assert o.token_ids["a"] == 1 and o.duration_s == 0.25 and o.energy_j == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.duration_s = 1.0


# -- StepOutput.for_plan (tokens as an array in plan row order) -------------------------------


def test_for_plan_maps_sampling_rows_in_plan_order():
    p = make_plan(GOOD_ROWS)  # rows "decode" and "lastchunk" sample
    o = StepOutput.for_plan(p, np.array([11, 12], np.int32), duration_s=0.5)
    assert dict(o.token_ids) == {"decode": 11, "lastchunk": 12} and o.duration_s == 0.5
    assert len(o.token_ids) == 2 and "prefill" not in o.token_ids and o.token_ids["decode"] == 11
    assert o.token_ids.array.dtype == np.int64 and not o.token_ids.array.flags.writeable
    assert o.token_ids.step == p.step


@pytest.mark.parametrize(
    "tokens,match",
    [
        ([1], "one token per sampling row"),
        ([1, 2, 3], "one token per sampling row"),
        ([[1, 2]], "one token per sampling row"),
        ([1.0, 2.0], "must be integers"),
        ([True, False], "must be integers"),
        (["1", "2"], "must be integers"),
        ([1, -1], r"must be in \[0, "),
        ([1, 2**31], r"must be in \[0, "),
        (np.array([1, 2**63], np.uint64), r"must be in \[0, "),
    ],
)
def test_for_plan_rejects_bad_tokens(tokens, match):
    with pytest.raises(ValueError, match=match):
        StepOutput.for_plan(make_plan(GOOD_ROWS), tokens)


def test_for_plan_copies_its_input():
    tokens = np.array([5, 6])
    o = StepOutput.for_plan(make_plan(GOOD_ROWS), tokens)
    tokens[0] = 99
    assert o.token_ids["decode"] == 5


def test_repeated_equals_for_plan_with_that_token_everywhere():
    p = make_plan(GOOD_ROWS)
    o = StepOutput.repeated(p, 7, duration_s=0.5, energy_j=2.0)
    ref = StepOutput.for_plan(p, np.array([7, 7]), duration_s=0.5, energy_j=2.0)
    assert dict(o.token_ids) == dict(ref.token_ids) and (o.duration_s, o.energy_j) == (0.5, 2.0)
    np.testing.assert_array_equal(o.token_ids.array, ref.token_ids.array)
    assert o.token_ids.array.dtype == np.int64 and not o.token_ids.array.flags.writeable
    assert o.token_ids.step == p.step
    for bad in (-1, 2**31, 1.0, True):
        with pytest.raises(ValueError, match="token id must be an int"):
            StepOutput.repeated(p, bad)
