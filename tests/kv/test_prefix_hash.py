"""Prefix-cache safety: exact block keys chained by a 256-bit digest, domain separation of token
and trace chains, per-request cache salts, and what still holds when every digest collides."""

import pytest
from hypothesis import given, settings, strategies as st

import jaxserve
from jaxserve.kv import BlockPool, KVConfig, chain_hashes, extend_chain, prompt_block_hashes
from jaxserve.kv import prefix_hash
from jaxserve.kv.prefix_hash import DIGEST_SIZE, block_digest, salt_field, trace_chain
from jaxserve.request import Request, SamplingParams
from jaxserve.scheduler.driver import drive

SP = SamplingParams(1)
salts = st.one_of(st.none(), st.text(min_size=1, max_size=6))


def tok_req(rid, tokens, salt=None, max_new=1):
    return Request(rid, prompt_token_ids=tokens, sampling=SamplingParams(max_new), cache_salt=salt)


def trace_req(rid, ids, prompt_len, span=512, salt=None):
    return Request(rid, prompt_len=prompt_len, sampling=SP, prefix_block_hashes=tuple(ids),
                   prefix_hash_block_size=span, cache_salt=salt)


@pytest.fixture
def colliding_digest(monkeypatch):
    """Every digest collides: only what a key spells out exactly still tells blocks apart."""
    monkeypatch.setattr(prefix_hash, "block_digest", lambda key: bytes(DIGEST_SIZE))


# -- (a) hash properties -----------------------------------------------------------------------


def test_digest_is_256_bits_and_chains_each_key_to_its_parent():
    assert DIGEST_SIZE * 8 >= 128 and len(block_digest(b"x")) == DIGEST_SIZE == 32
    keys = chain_hashes(list(range(12)), 4, 3)
    for parent, key in zip(keys, keys[1:]):
        assert key[:1] == b"T" and key[1 : 1 + DIGEST_SIZE] == block_digest(parent)
    assert keys[0][:1] == b"S" and keys[0].startswith(b"S" + salt_field(None))


@given(
    a=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=24),
    b=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=24),
    bs=st.integers(1, 6),
    salt_a=salts,
    salt_b=salts,
)
@settings(max_examples=200, deadline=None)
def test_keys_are_equal_exactly_when_salt_and_tokens_up_to_the_block_are(a, b, bs, salt_a, salt_b):
    ka = prompt_block_hashes(tok_req("a", a, salt_a), bs)
    kb = prompt_block_hashes(tok_req("b", b, salt_b), bs)
    for i in range(min(len(ka), len(kb))):
        same = salt_a == salt_b and a[: (i + 1) * bs] == b[: (i + 1) * bs]
        assert (ka[i] == kb[i]) == same, i


def test_chain_depends_on_parent_tokens_order_and_salt():
    base = chain_hashes([1, 2, 3, 4], 2, 2)
    assert base[0] != base[1] and chain_hashes([3, 4], 2, 1) != base[1:]  # the parent counts
    assert chain_hashes([3, 4], 2, 1, parent=base[0]) == base[1:]
    assert chain_hashes([2, 1, 3, 4], 2, 2)[1] != base[1]  # a change upstream changes every later key
    assert chain_hashes([1, 2, 4, 3], 2, 2)[1] != base[1]  # order inside a block counts
    assert chain_hashes([1, 2, 3, 4], 2, 2, salt="t1") == chain_hashes([1, 2, 3, 4], 2, 2, salt="t1")
    salted = chain_hashes([1, 2, 3, 4], 2, 2, salt="t1")
    assert not set(salted) & set(base) and not set(salted) & set(chain_hashes([1, 2, 3, 4], 2, 2, salt="t2"))
    assert extend_chain((), [1, 2], salt="t1") == salted[0] and extend_chain(salted[:1], [3, 4]) == salted[1]
    # ids are encoded exactly, as int32: no two ids share bytes
    assert chain_hashes([2**31 - 1], 1, 1) != chain_hashes([0], 1, 1)
    with pytest.raises(OverflowError):
        chain_hashes([2**31], 1, 1)


def test_salt_field_is_exact():
    fields = [salt_field(s) for s in (None, "a", "0", "0:", "1:a", "a" * 10, "\udc80", "é")]
    assert len(set(fields)) == len(fields)
    # a salt cannot pose as tokens: the field is length-prefixed, so first keys parse uniquely
    assert chain_hashes([ord("b")], 1, 1, salt="a") != chain_hashes([0], 1, 1, salt="a\x62\0\0\0")


def test_the_salt_enters_only_the_first_key_and_reaches_every_block_through_the_chain():
    toks = list(range(16))
    plain = prompt_block_hashes(tok_req("a", toks), 4)
    salted = prompt_block_hashes(tok_req("b", toks, "tenant-7"), 4)
    assert b"tenant-7" in salted[0] and not any(b"tenant-7" in k for k in salted[1:])
    assert all(x != y for x, y in zip(plain, salted))
    assert plain == prompt_block_hashes(tok_req("c", toks, None), 4)


def test_token_and_trace_chains_are_domain_separated(colliding_digest):
    # Even with every digest colliding and a block size where the layouts have equal lengths.
    for bs in (1, 2, 4, 16):
        for salt in (None, "s"):
            trace = prompt_block_hashes(trace_req("t", [0, 1, 2, 3], 4 * bs, span=bs, salt=salt), bs)
            toks = prompt_block_hashes(tok_req("k", [0, 1, 2, 3] * bs, salt), bs)
            assert trace and toks and not set(trace) & set(toks)
            assert {k[:1] for k in toks} <= {b"S", b"T"} and {k[:1] for k in trace} <= {b"M", b"N"}


def test_trace_chain_salted_and_one_digest_per_trace_id(monkeypatch):
    calls = []
    monkeypatch.setattr(prefix_hash, "block_digest", lambda key: calls.append(key) or block_digest(key))
    keys = trace_chain([5, 6, 7], 512, 16, 3 * 32)
    assert len(keys) == 96 and len(set(keys)) == 96 and len(calls) == 2  # not one per block
    a = prompt_block_hashes(trace_req("a", [5, 6], 1024, salt="x"), 16)
    assert a == prompt_block_hashes(trace_req("b", [5, 6], 1024, salt="x"), 16)
    assert not set(a) & set(prompt_block_hashes(trace_req("c", [5, 6], 1024), 16))
    assert not set(a) & set(prompt_block_hashes(trace_req("d", [5, 6], 1024, salt="y"), 16))


# -- (b) a collision never hands one prompt another's KV ---------------------------------------


def register_prompt(pool, keys):
    pool, blocks = pool.allocate(len(keys))
    return pool.register(blocks, keys), blocks


def test_colliding_digest_gives_no_hit_on_another_prompts_blocks(colliding_digest):
    bs = 4
    a = prompt_block_hashes(tok_req("a", [1, 2, 3, 4, 9, 9, 9, 9, 8, 8, 8, 8]), bs)
    b = prompt_block_hashes(tok_req("b", [5, 6, 7, 8, 9, 9, 9, 9, 8, 8, 8, 8]), bs)  # same later blocks
    assert a[1:] == b[1:]  # the digests collide by construction, so the later keys coincide...
    pool, blocks = register_prompt(BlockPool(16, enable_caching=True), a)
    assert pool.match_prefix(b) == ()  # ...but a's first block holds other tokens: no hit at all
    # a shared first block still hits, exactly that block; a different second block does not
    c = prompt_block_hashes(tok_req("c", [1, 2, 3, 4, 0, 0, 0, 0]), bs)
    assert pool.match_prefix(c) == blocks[:1]
    # and a salt keeps apart what the digest cannot
    assert pool.match_prefix(prompt_block_hashes(tok_req("d", [1, 2, 3, 4], "t"), bs)) == ()
    pool.check()


@given(
    prompts=st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=2, max_size=12), st.sampled_from([None, "x"])),
                     min_size=1, max_size=6),
    query=st.tuples(st.lists(st.integers(0, 3), min_size=2, max_size=12), st.sampled_from([None, "x"])),
)
@settings(max_examples=200, deadline=None)
def test_colliding_digest_every_hit_holds_the_asked_for_tokens(prompts, query):
    """With every digest colliding, a hit still holds exactly the request's tokens at that block
    (and its salt, for the first block): keys are compared exactly, never by hash alone."""
    bs = 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prefix_hash, "block_digest", lambda key: bytes(DIGEST_SIZE))
        pool = BlockPool(64, enable_caching=True)
        content = {}  # block -> (its tokens, the salt of its chain)
        for i, (toks, salt) in enumerate(prompts):
            keys = prompt_block_hashes(tok_req(f"p{i}", toks, salt), bs)
            pool, blocks = register_prompt(pool, keys)
            for k, b in enumerate(blocks):
                content[b] = (tuple(toks[k * bs : (k + 1) * bs]), salt)
        toks, salt = query
        hits = pool.match_prefix(prompt_block_hashes(tok_req("q", toks, salt), bs))
    for k, b in enumerate(hits):
        assert b in pool.block_hash and content[b][0] == tuple(toks[k * bs : (k + 1) * bs])
    if hits:
        assert content[hits[0]][1] == salt


def test_colliding_digest_deeper_blocks_rely_on_the_digest():
    """The limit of what exact keys alone give: a block's tokens are checked, the tokens before it
    only through its parent's digest. With a broken digest a deep false hit exists; BLAKE2b-256
    closes it (a collision costs ~2^128 work)."""
    bs = 2
    p, r, q = [1, 1, 7, 7], [2, 2, 7, 7], [2, 2, 7, 7]  # q = r; p's second block computed after [1, 1]

    def hits_of_q(pool_prompts):
        pool = BlockPool(16, enable_caching=True)
        for toks in pool_prompts:
            pool, _ = register_prompt(pool, prompt_block_hashes(tok_req("x", toks), bs))
        owner = dict(zip(pool.block_hash.values(), pool.block_hash.keys()))
        return pool.match_prefix(prompt_block_hashes(tok_req("q", q), bs)), owner

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prefix_hash, "block_digest", lambda key: bytes(DIGEST_SIZE))
        hits, _ = hits_of_q([p, r])
    assert hits == (2, 1)  # r's first block, then p's second block (computed after p's first): wrong KV
    hits, _ = hits_of_q([p, r])
    assert hits == (2, 3)  # the real digest: r's own two blocks


def first_plan_row(result, rid):
    i = next(i for i, p in enumerate(result.plans) if rid in p.request_ids)
    return result.plans[i], result.plans[i].request_ids.index(rid)


def test_colliding_digest_scheduler_gives_no_false_hit(colliding_digest):
    kv = KVConfig(num_blocks=64, block_size=4)
    tail = list(range(200, 208))
    # a still runs when b arrives, so b could only share a's blocks through a (false) cache hit
    reqs = [tok_req("a", [1, 2, 3, 4] + tail + [9], max_new=8), tok_req("b", [5, 6, 7, 8] + tail + [9])]
    result = drive(jaxserve.scheduler.make("vllm", enable_prefix_caching=True), kv, reqs, arrival_steps=[0, 2])
    plan, row = first_plan_row(result, "b")
    assert plan.num_computed_tokens[row] == 0 and set(plan.block_tables[row]).isdisjoint(result.plans[0].block_tables[0])


# -- (c) cache salts through the real schedulers ------------------------------------------------


@pytest.mark.parametrize("name", ["vllm", "sarathi"])
def test_cache_salt_separates_tenants_and_equal_salts_share(name):
    kv = KVConfig(num_blocks=128, block_size=4)
    prompt = list(range(300, 313))  # 3 full blocks + 1 token
    reqs = [
        tok_req("alice1", prompt, "alice"),
        tok_req("bob", prompt, "bob"),
        tok_req("alice2", prompt, "alice"),
        tok_req("plain1", prompt),
        tok_req("plain2", prompt),
    ]
    sched = jaxserve.scheduler.make(name, enable_prefix_caching=True)
    result = drive(sched, kv, reqs, arrival_steps=[0, 3, 3, 3, 6])
    computed = {}
    for r in reqs:
        plan, row = first_plan_row(result, r.request_id)
        computed[r.request_id] = int(plan.num_computed_tokens[row])
    assert computed == {"alice1": 0, "bob": 0, "alice2": 12, "plain1": 0, "plain2": 12}
    assert all(f.output_token_ids for f in result.finished.values()) and len(result.finished) == 5


def test_cache_salt_applies_to_generated_blocks_of_short_prompts():
    """A prompt shorter than a block has no prompt chain; its generated blocks start one, with the
    request's salt (multi-turn reuse stays within the tenant)."""
    kv = KVConfig(num_blocks=64, block_size=4)
    first = tok_req("t1", [1, 2], "alice", max_new=7)  # 2 + 7 tokens: 2 full blocks once finished
    sched = jaxserve.scheduler.make("vllm", enable_prefix_caching=True)
    turn1 = drive(sched, kv, [first], token_fn=lambda rid, i: 40 + i)
    out = turn1.finished["t1"].output_token_ids
    follow = [1, 2] + list(out) + [99]
    reqs = [first, tok_req("t2", follow, "alice"), tok_req("t2x", follow, "eve"), tok_req("t2n", follow)]
    result = drive(sched, kv, reqs, arrival_steps=[0, 20, 20, 20], token_fn=lambda rid, i: 40 + i)
    got = {rid: int(p.num_computed_tokens[row]) for rid in ("t2", "t2x", "t2n") for p, row in [first_plan_row(result, rid)]}
    assert got == {"t2": 8, "t2x": 0, "t2n": 0}
