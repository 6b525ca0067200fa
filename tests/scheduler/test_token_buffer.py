"""TokenBuffer: slots, writes, growth, and full persistence (every version keeps its content)."""

import numpy as np
from hypothesis import given, settings, strategies as st

from jaxserve.scheduler.token_buffer import TokenBuffer


def test_take_write_read_release():
    buf, slots = TokenBuffer(num_slots=2, width=4).take([(), (5, 6)])
    assert slots == (0, 1)
    assert buf.read(1, 2) == (5, 6) and buf.read(0, 0) == ()
    buf2 = buf.write(np.array([0, 1]), np.array([0, 2]), np.array([7, 8]))
    assert buf2.read(0, 1) == (7,) and buf2.read(1, 3) == (5, 6, 8)
    assert buf.read(1, 2) == (5, 6)  # the older version is unchanged
    buf3, again = buf2.release([0]).take([(9,)])
    assert again == (0,) and buf3.read(0, 1) == (9,) and buf2.read(0, 1) == (7,)
    assert buf3.next_fresh - buf3.num_stacked == 2  # slot 0 reused, not a third slot


def test_growth_in_slots_and_width_keeps_every_version():
    buf, _ = TokenBuffer(num_slots=1, width=2).take([(1, 2)])
    grown, slots = buf.take([tuple(range(10, 15))])  # a second slot and a width of 5
    assert slots == (1,) and grown.num_slots == 2 and grown.width >= 5
    assert grown.read(0, 2) == (1, 2) and grown.read(1, 5) == (10, 11, 12, 13, 14)
    wide = grown.write(np.array([0]), np.array([9]), np.array([3]))  # position 9: width grows again
    assert wide.width >= 10 and wide.read(0, 2) == (1, 2) and wide.read(1, 5) == (10, 11, 12, 13, 14)
    assert buf.read(0, 2) == (1, 2) and grown.read(1, 5) == (10, 11, 12, 13, 14)


def test_two_dimensional_write_appends_k_ids_per_slot():
    buf, slots = TokenBuffer(num_slots=4, width=2).take([(1,), (2, 3)])
    slots = np.array(slots)
    pos = np.array([1, 2])[:, None] + np.arange(3)
    out = buf.write(slots, pos, np.full(pos.shape, 4))
    assert out.read(0, 4) == (1, 4, 4, 4) and out.read(1, 5) == (2, 3, 4, 4, 4)


def test_fill_writes_one_token_k_times_per_slot_and_keeps_the_older_version():
    buf, slots = TokenBuffer(num_slots=4, width=2).take([(1,), (2, 3), ()])
    slots, starts = np.array(slots), np.array([1, 2, 0])
    out = buf.fill(slots, starts, 3, 4)  # width 2 -> 5: grows
    pos = starts[:, None] + np.arange(3)
    ref = buf.write(slots, pos, np.full(pos.shape, 4))
    for s, n in zip(slots.tolist(), (4, 5, 3)):
        assert out.read(s, n) == ref.read(s, n)
    assert out.read(0, 4) == (1, 4, 4, 4) and out.read(2, 3) == (4, 4, 4)
    assert buf.read(1, 2) == (2, 3) and buf.fill(slots, starts, 0, 4) is buf
    assert out.fill(slots[:1], np.array([4]), 1, 7).read(0, 5) == (1, 4, 4, 4, 7)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(ops=st.lists(st.tuples(st.sampled_from(["take", "write", "release", "back"]), st.integers(0, 10**6)), max_size=40))
def test_matches_a_reference_model_across_versions(ops):
    """Random operations, sometimes continuing from an older version: every version always reads
    as the reference model says."""
    rng = np.random.default_rng(len(ops))
    versions = [(TokenBuffer(num_slots=1, width=1), {})]  # (buffer, slot -> ids)
    for op, x in ops:
        buf, model = versions[-1]
        if op == "back":
            buf, model = versions[x % len(versions)]
        elif op == "take":
            prior = [tuple(rng.integers(0, 100, x % 4).tolist()) for _ in range(1 + x % 2)]
            buf, slots = buf.take(prior)
            assert not set(slots) & set(model) and len(set(slots)) == len(slots)
            model = {**model, **dict(zip(slots, prior))}
        elif op == "write" and model:
            slots = sorted(model)[: 1 + x % len(model)]
            tokens = rng.integers(0, 100, len(slots))
            buf = buf.write(np.array(slots), np.array([len(model[s]) for s in slots]), tokens)
            model = {**model, **{s: model[s] + (int(t),) for s, t in zip(slots, tokens)}}
        elif op == "release" and model:
            s = sorted(model)[x % len(model)]
            buf = buf.release([s])
            model = {k: v for k, v in model.items() if k != s}
        versions.append((buf, model))
        for old_buf, old_model in versions[:: max(1, len(versions) // 4)] + [versions[-1]]:
            for slot, ids in old_model.items():
                assert old_buf.read(slot, len(ids)) == ids
