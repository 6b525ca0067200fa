"""The hand-off from engine threads to the event loop (batched wake-ups, merged outputs) and the
pre-rendered server-sent events."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxserve.serve.engine_loop import RequestOutput
from jaxserve.serve.handoff import Handoff, Mailbox, merge
from jaxserve.serve.sse import ChunkEncoder


class CountingHandoff(Handoff):
    def __init__(self, aio):
        super().__init__(aio)
        self.flushes = 0

    def _flush(self):
        self.flushes += 1
        super()._flush()


def test_a_burst_from_another_thread_costs_one_wake_up_and_keeps_order():
    aio = asyncio.new_event_loop()
    try:
        handoff, boxes = CountingHandoff(aio), [Mailbox(), Mailbox()]
        # The event loop is not running while the engine thread posts: the whole burst must ride on one wake-up.
        poster = threading.Thread(target=lambda: [handoff.post(boxes[k % 2], k) for k in range(100)])
        poster.start()
        poster.join()
        async def both():
            return [await boxes[0].get(), await boxes[1].get()]

        got = aio.run_until_complete(both())
        assert got == [list(range(0, 100, 2)), list(range(1, 100, 2))]
        assert handoff.flushes == 1
        handoff.post(boxes[0], "late")  # after a flush, the next post wakes the loop again
        assert aio.run_until_complete(asyncio.wait_for(boxes[0].get(), 10)) == ["late"] and handoff.flushes == 2
    finally:
        aio.close()


def test_a_closed_loop_refuses_and_the_next_post_still_wakes():
    aio = asyncio.new_event_loop()
    handoff = Handoff(aio)
    aio.close()
    with pytest.raises(RuntimeError):
        handoff.post(Mailbox(), 1)
    assert not handoff._scheduled  # a refused wake-up is not left pending


def test_mailbox_close_wakes_a_waiting_reader():
    async def scenario():
        box = Mailbox()
        reader = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        box.close()
        return await reader, box.closed

    assert asyncio.run(scenario()) == ([], True)


def out(rid, ids, reason=None, error=None):
    return RequestOutput(rid, tuple(ids), reason, error)


def test_merge_joins_each_requests_outputs_but_keeps_abnormal_endings_apart():
    batch = [(0, out("a", [1])), (1, out("b", [7])), (0, out("a", [2])), (0, out("a", [3], "length")),
             (1, out("b", [8])), (1, out("b", [], "error", "boom"))]  # fmt: skip
    assert merge(batch) == [(0, out("a", [1, 2, 3], "length")), (1, out("b", [7, 8])), (1, out("b", [], "error", "boom"))]
    assert merge([(0, out("a", [], "abort"))]) == [(0, out("a", [], "abort"))]
    assert merge([(0, out("a", [1])), (0, out("a", [], "abort"))]) == [(0, out("a", [1])), (0, out("a", [], "abort"))]


@given(text=st.text(max_size=20), ids=st.lists(st.integers(0, 10**6), max_size=5), index=st.integers(0, 3),
       chat=st.booleans(), usage=st.booleans(), with_ids=st.booleans())  # fmt: skip
def test_the_token_chunk_template_is_the_chunk_json_dumps_writes(text, ids, index, chat, usage, with_ids):
    enc = ChunkEncoder('cmpl-"x"', "m\u00e9", 1700000000, chat, usage, with_ids)
    if chat:
        choice = {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
    if with_ids:
        choice["token_ids"] = ids
    fast, slow = enc.delta(index, text, ids), enc.chunk(choice)
    assert fast == slow  # byte for byte, key order included
    assert fast.startswith("data: ") and fast.endswith("\n\n")
    data = json.loads(fast[len("data: ") :])
    assert data["choices"] == [choice] and data["model"] == "m\u00e9" and ("usage" in data) == usage
