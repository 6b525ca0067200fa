"""Request, SamplingParams, SLO and PlaceholderTokens: validation, coercion, immutability."""

import dataclasses
import math
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxserve.request import (
    PLACEHOLDER_TOKEN_ID,
    SLO,
    PlaceholderTokens,
    Request,
    RequestStatus,
    SamplingParams,
)

SP = SamplingParams(max_new_tokens=4)


def req(**kw):
    kw.setdefault("request_id", "r0")
    kw.setdefault("sampling", SP)
    if "prompt_token_ids" not in kw and "prompt_len" not in kw:
        kw["prompt_token_ids"] = (1, 2, 3)
    return Request(**kw)


# -- SamplingParams ---------------------------------------------------------------------------

BAD_SAMPLING = [
    ("max_new_tokens", 0),
    ("max_new_tokens", -3),
    ("max_new_tokens", 1.5),
    ("max_new_tokens", 2.0),
    ("max_new_tokens", True),
    ("max_new_tokens", "3"),
    ("max_new_tokens", None),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", True),
    ("temperature", "1.0"),
    ("temperature", None),
    ("top_k", -1),
    ("top_k", 1.0),
    ("top_k", True),
    ("top_k", "2"),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.0000001),
    ("top_p", 2),
    ("top_p", math.nan),
    ("top_p", math.inf),
    ("top_p", True),
    ("top_p", "0.5"),
    ("seed", -1),
    ("seed", 1.5),
    ("seed", True),
    ("seed", "7"),
    ("stop_token_ids", "abc"),
    ("stop_token_ids", b"ab"),
    ("stop_token_ids", 5),
    ("stop_token_ids", {1, 2}),
    ("stop_token_ids", [1, -1]),
    ("stop_token_ids", [1, 1.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", np.array([1.5, 2.0])),
]


@pytest.mark.parametrize("field,value", BAD_SAMPLING, ids=[f"{f}={v!r}" for f, v in BAD_SAMPLING])
def test_sampling_params_rejects_bad_field(field, value):
    kw = {"max_new_tokens": 4, field: value}
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**kw)


def test_sampling_params_defaults_and_valid_edges():
    sp = SamplingParams(1)
    assert (sp.max_new_tokens, sp.temperature, sp.top_k, sp.top_p, sp.seed, sp.stop_token_ids) == (
        1, 1.0, 0, 1.0, None, ()
    )
    sp = SamplingParams(7, temperature=0, top_k=5, top_p=1.0, seed=0, stop_token_ids=[2, 0])
    assert sp.temperature == 0 and sp.top_p == 1.0 and sp.seed == 0
    assert sp.stop_token_ids == (2, 0) and isinstance(sp.stop_token_ids, tuple)
    assert SamplingParams(1, top_p=1e-9).top_p == 1e-9
    assert SamplingParams(1, temperature=3).temperature == 3


def test_sampling_params_numpy_stop_ids_become_python_ints():
    sp = SamplingParams(3, stop_token_ids=np.array([5, 9], dtype=np.int64))
    assert sp.stop_token_ids == (5, 9)
    assert isinstance(sp.stop_token_ids, tuple)
    assert all(type(t) is int for t in sp.stop_token_ids)


def test_sampling_params_is_frozen():
    sp = SamplingParams(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sp.max_new_tokens = 5
    assert sp.max_new_tokens == 3


def test_sampling_params_equal_and_hashable():
    a = SamplingParams(3, stop_token_ids=[1, 2])
    b = SamplingParams(3, stop_token_ids=(1, 2))
    assert a == b and hash(a) == hash(b)
    assert a != SamplingParams(3, stop_token_ids=(2, 1))


# -- SLO --------------------------------------------------------------------------------------

BAD_SLO = [
    (name, value)
    for name in ("ttft_s", "tpot_s")
    for value in (0, 0.0, -1.0, math.nan, math.inf, True, "1.0")
]


@pytest.mark.parametrize("field,value", BAD_SLO, ids=[f"{f}={v!r}" for f, v in BAD_SLO])
def test_slo_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SLO(**{field: value})


def test_slo_valid_values():
    assert SLO() == SLO(None, None)
    s = SLO(ttft_s=0.5, tpot_s=2)
    assert (s.ttft_s, s.tpot_s) == (0.5, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.ttft_s = 1.0


# -- Request validation -----------------------------------------------------------------------

BAD_REQUEST = [
    ({"request_id": ""}, "request_id"),
    ({"request_id": 5}, "request_id"),
    ({"request_id": None}, "request_id"),
    ({"sampling": None}, "sampling"),
    ({"sampling": {"max_new_tokens": 3}}, "sampling"),
    ({"sampling": 3}, "sampling"),
    ({"prompt_token_ids": []}, "prompt_token_ids"),
    ({"prompt_token_ids": ()}, "prompt_token_ids"),
    ({"prompt_token_ids": np.array([], dtype=np.int64)}, "prompt_token_ids"),
    ({"prompt_token_ids": "abc"}, "prompt_token_ids"),
    ({"prompt_token_ids": b"abc"}, "prompt_token_ids"),
    ({"prompt_token_ids": 7}, "prompt_token_ids"),
    ({"prompt_token_ids": {1, 2}}, "prompt_token_ids"),
    ({"prompt_token_ids": (i for i in range(3))}, "prompt_token_ids"),
    ({"prompt_token_ids": [1, -2]}, "prompt_token_ids"),
    ({"prompt_token_ids": [1, 2.0]}, "prompt_token_ids"),
    ({"prompt_token_ids": [1, True]}, "prompt_token_ids"),
    ({"prompt_token_ids": [1, None]}, "prompt_token_ids"),
    ({"prompt_token_ids": np.array([1.0, 2.0])}, "prompt_token_ids"),
    ({"prompt_token_ids": np.array([[1, 2], [3, 4]])}, "prompt_token_ids"),
    ({"prompt_token_ids": np.array([3, -1])}, "prompt_token_ids"),
    ({"prompt_token_ids": [1, 2, 3], "prompt_len": 4}, "prompt_len"),
    ({"prompt_token_ids": [1, 2, 3], "prompt_len": 2}, "prompt_len"),
    ({"prompt_token_ids": [1, 2, 3], "prompt_len": -3}, "prompt_len"),
    ({"prompt_token_ids": None, "prompt_len": 0}, "prompt_len"),
    ({"prompt_token_ids": None, "prompt_len": -5}, "prompt_len"),
    ({"prompt_token_ids": None, "prompt_len": 2.5}, "prompt_len"),
    ({"prompt_token_ids": None, "prompt_len": 3.0}, "prompt_len"),
    ({"prompt_token_ids": None, "prompt_len": True}, "prompt_len"),
    ({"prompt_token_ids": None, "prompt_len": "3"}, "prompt_len"),
    ({"arrival_time": -0.001}, "arrival_time"),
    ({"arrival_time": math.nan}, "arrival_time"),
    ({"arrival_time": math.inf}, "arrival_time"),
    ({"arrival_time": True}, "arrival_time"),
    ({"arrival_time": "0"}, "arrival_time"),
    ({"arrival_time": None}, "arrival_time"),
    ({"client_id": ""}, "client_id"),
    ({"client_id": None}, "client_id"),
    ({"client_id": 3}, "client_id"),
    ({"priority": 1.5}, "priority"),
    ({"priority": 1.0}, "priority"),
    ({"priority": True}, "priority"),
    ({"priority": "1"}, "priority"),
    ({"priority": None}, "priority"),
    ({"prefix_hash_block_size": 0}, "prefix_hash_block_size"),
    ({"prefix_hash_block_size": -512}, "prefix_hash_block_size"),
    ({"prefix_hash_block_size": True}, "prefix_hash_block_size"),
    ({"prefix_hash_block_size": 512.0}, "prefix_hash_block_size"),
    ({"prefix_block_hashes": "abc"}, "prefix_block_hashes"),
    ({"prefix_block_hashes": 5}, "prefix_block_hashes"),
    ({"prefix_block_hashes": [1, 1.5]}, "prefix_block_hashes"),
    ({"prefix_block_hashes": [1, True]}, "prefix_block_hashes"),
    ({"prefix_block_hashes": [1, "2"]}, "prefix_block_hashes"),
    ({"slo": 3}, "slo"),
    ({"slo": {"ttft_s": 1.0}}, "slo"),
]


@pytest.mark.parametrize("kw,field", BAD_REQUEST, ids=[f"{k}" for k, _ in BAD_REQUEST])
def test_request_rejects_bad_field(kw, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        req(**kw)


def test_request_needs_ids_or_len():
    with pytest.raises(ValueError, match=r"prompt_token_ids or prompt_len"):
        Request("r", sampling=SP)


def test_request_valid_fields_are_kept():
    slo = SLO(ttft_s=1.0)
    r = Request(
        "abc",
        prompt_token_ids=[5, 6, 7, 8],
        sampling=SP,
        arrival_time=2.5,
        client_id="alice",
        priority=-3,
        prefix_block_hashes=[11, -12],
        prefix_hash_block_size=64,
        slo=slo,
    )
    assert r.request_id == "abc"
    assert r.prompt_token_ids == (5, 6, 7, 8) and isinstance(r.prompt_token_ids, tuple)
    assert r.prompt_len == 4
    assert r.arrival_time == 2.5 and r.client_id == "alice" and r.priority == -3
    assert r.prefix_block_hashes == (11, -12) and isinstance(r.prefix_block_hashes, tuple)
    assert r.prefix_hash_block_size == 64
    assert r.slo is slo
    assert r.has_real_tokens
    assert r.max_total_tokens == 4 + SP.max_new_tokens
    # defaults
    d = req()
    assert (d.arrival_time, d.client_id, d.priority, d.slo, d.prefix_block_hashes) == (0.0, "default", 0, None, None)
    assert d.prefix_hash_block_size == 512


def test_request_zero_token_id_and_integer_arrival_time_are_valid():
    r = req(prompt_token_ids=[0], arrival_time=0)
    assert r.prompt_token_ids == (0,) and r.prompt_len == 1


@pytest.mark.parametrize(
    "ids",
    [
        [3, 1, 4, 1, 5],
        (3, 1, 4, 1, 5),
        range(3, 8),
        np.array([3, 1, 4, 1, 5], dtype=np.int64),
        np.array([3, 1, 4, 1, 5], dtype=np.int32),
        np.array([3, 1, 4, 1, 5], dtype=np.uint16),
    ],
    ids=["list", "tuple", "range", "np-int64", "np-int32", "np-uint16"],
)
def test_request_prompt_ids_coerced_to_tuple_of_python_ints(ids):
    expected = tuple(int(t) for t in ids)
    r = req(prompt_token_ids=ids)
    assert type(r.prompt_token_ids) is tuple
    assert r.prompt_token_ids == expected
    assert all(type(t) is int for t in r.prompt_token_ids)
    assert r.prompt_len == len(expected)
    # The request keeps its own copy: mutating the caller's container changes nothing.
    if isinstance(ids, (list, np.ndarray)):
        ids[0] = 99
        assert r.prompt_token_ids == expected


def test_request_prompt_len_agreeing_with_ids_is_accepted():
    r = req(prompt_token_ids=[1, 2, 3], prompt_len=3)
    assert r.prompt_len == 3 and r.prompt_token_ids == (1, 2, 3)


@given(ids=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=50), delta=st.integers(-60, 60))
@settings(max_examples=100, deadline=None)
def test_request_prompt_len_must_match_len_ids(ids, delta):
    if delta == 0:
        assert req(prompt_token_ids=ids, prompt_len=len(ids)).prompt_len == len(ids)
    else:
        with pytest.raises(ValueError, match="prompt_len"):
            req(prompt_token_ids=ids, prompt_len=len(ids) + delta)


# -- placeholder (length-only) requests -------------------------------------------------------


def test_prompt_len_only_request_gets_placeholders():
    r = req(prompt_len=6)
    assert isinstance(r.prompt_token_ids, PlaceholderTokens)
    assert not r.has_real_tokens
    assert r.prompt_len == 6 == len(r.prompt_token_ids)
    assert list(r.prompt_token_ids) == [PLACEHOLDER_TOKEN_ID] * 6
    assert tuple(r.prompt_token_ids) == (0,) * 6
    assert r.max_total_tokens == 6 + SP.max_new_tokens


def test_placeholder_len_indexing_and_bounds():
    p = PlaceholderTokens(5)
    assert len(p) == 5
    assert p[0] == p[4] == p[-1] == p[-5] == PLACEHOLDER_TOKEN_ID
    with pytest.raises(IndexError):
        p[5]
    with pytest.raises(IndexError):
        p[-6]
    with pytest.raises(IndexError):
        PlaceholderTokens(0)[0]
    assert list(PlaceholderTokens(0)) == []


@given(n=st.integers(0, 40), start=st.none() | st.integers(-50, 50), stop=st.none() | st.integers(-50, 50),
       step=st.none() | st.integers(-5, 5).filter(lambda s: s != 0))
@settings(max_examples=150, deadline=None)
def test_placeholder_slicing_matches_list_slicing(n, start, stop, step):
    p = PlaceholderTokens(n)
    ref = [PLACEHOLDER_TOKEN_ID] * n
    s = p[start:stop:step]
    assert isinstance(s, PlaceholderTokens)
    assert len(s) == len(ref[start:stop:step])
    assert list(s) == ref[start:stop:step]


def test_placeholder_equality():
    assert PlaceholderTokens(3) == PlaceholderTokens(3)
    assert PlaceholderTokens(3) != PlaceholderTokens(4)
    assert PlaceholderTokens(3) != (0, 0, 0)  # only placeholders equal placeholders
    assert list(PlaceholderTokens(3)) == [0, 0, 0]
    assert PlaceholderTokens(3) != (0, 0)
    assert PlaceholderTokens(3) != (0, 0, 0, 0)
    assert PlaceholderTokens(3) != (0, 1, 0)
    assert (0, 0, 7) != PlaceholderTokens(3)
    assert PlaceholderTokens(3) != 3
    assert PlaceholderTokens(3) != None  # noqa: E711
    assert hash(PlaceholderTokens(9)) == hash(PlaceholderTokens(9))
    assert len({PlaceholderTokens(2), PlaceholderTokens(2), PlaceholderTokens(5)}) == 2


def test_placeholder_equals_only_placeholders_and_hash_agrees():
    assert PlaceholderTokens(3) != (0, 0, 0)
    a = Request("r", prompt_len=3, sampling=SP)
    b = Request("r", prompt_token_ids=(0, 0, 0), sampling=SP)
    assert a != b
    c = Request("r", prompt_len=3, sampling=SP)
    assert a == c and hash(a) == hash(c)


def test_placeholder_is_o1_memory():
    n = 10**12
    t0 = time.perf_counter()
    r = req(prompt_len=n)
    built = time.perf_counter() - t0
    p = r.prompt_token_ids
    assert len(p) == n and r.prompt_len == n
    assert p[n - 1] == PLACEHOLDER_TOKEN_ID
    assert len(p[10:n - 10]) == n - 20
    assert not hasattr(p, "__dict__")
    assert sys.getsizeof(p) < 128
    assert sys.getsizeof(p[1:]) < 128
    assert built < 0.1
    assert r.max_total_tokens == n + SP.max_new_tokens


def test_placeholder_request_is_not_equal_to_real_nonzero_request():
    assert req(prompt_len=3) != req(prompt_token_ids=(1, 2, 3))


def test_replace_on_placeholder_request_keeps_placeholders():
    r = req(prompt_len=8)
    r2 = dataclasses.replace(r, arrival_time=4.0, request_id="r1")
    assert isinstance(r2.prompt_token_ids, PlaceholderTokens)
    assert r2.prompt_len == 8 and r2.arrival_time == 4.0 and r2.request_id == "r1"
    assert r.arrival_time == 0.0 and r.request_id == "r0"


def test_placeholder_ids_with_disagreeing_prompt_len_rejected():
    with pytest.raises(ValueError, match="prompt_len"):
        Request("r", prompt_token_ids=PlaceholderTokens(5), prompt_len=7, sampling=SP)


def test_empty_placeholder_ids_rejected():
    with pytest.raises(ValueError, match="prompt"):
        Request("r", prompt_token_ids=PlaceholderTokens(0), sampling=SP)


def test_bool_prompt_len_with_ids_rejected():
    with pytest.raises(ValueError, match="prompt_len"):
        Request("r", prompt_token_ids=[5], prompt_len=True, sampling=SP)


# -- immutability -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("request_id", "x"), ("prompt_token_ids", (9,)), ("prompt_len", 9), ("arrival_time", 1.0),
     ("sampling", SamplingParams(9)), ("priority", 5), ("client_id", "bob")],
)
def test_request_is_frozen(field, value):
    r = req()
    before = getattr(r, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(r, field, value)
    assert getattr(r, field) == before


def test_request_equality_and_hash_by_value():
    a = req(prompt_token_ids=[1, 2], arrival_time=1.0)
    b = req(prompt_token_ids=np.array([1, 2]), arrival_time=1.0)
    assert a == b and hash(a) == hash(b)
    assert a != req(prompt_token_ids=[1, 2], arrival_time=2.0)


def test_request_status_values():
    assert {s.value for s in RequestStatus} == {"waiting", "running", "swapped", "finished", "aborted"}


def test_token_ids_must_fit_int32():
    with pytest.raises(ValueError, match="token id"):
        req(prompt_token_ids=[5, 2**31])
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(4, stop_token_ids=(2**40,))
