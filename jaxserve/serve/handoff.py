"""Engine thread -> event loop: outputs posted by engine-loop threads reach the HTTP handlers on one
asyncio loop in batches, as vLLM's ``AsyncLLM`` output handler does.

    handoff = Handoff(asyncio.get_running_loop())
    box = Mailbox()
    loop.submit(request, lambda out: handoff.post(box, (index, out)))   # the engine's sink (any thread)
    batch = await box.get()                                            # event loop: [(index, output), ...]

``post`` appends to a deque and wakes the event loop only when no wake-up is pending, so a step's
outputs for every request cost one ``call_soon_threadsafe`` (a self-pipe write and a loop wake-up),
not one per output; the engine thread never waits for the event loop. A ``Mailbox`` keeps what
arrived until its handler reads it; ``merge`` joins a request's outputs that piled up meanwhile, so
a handler that falls behind sends fewer, larger chunks instead of falling further behind.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Optional

from jaxserve.serve.engine_loop import RequestOutput


class Mailbox:
    """What the engine produced for one HTTP request, read on the event loop. ``get()`` returns
    everything that arrived since the last call (waiting for at least one item), or ``[]`` once
    ``close()`` was called (the client left) and nothing is left."""

    def __init__(self) -> None:
        self._items: list = []
        self._waiter: Optional[asyncio.Future] = None
        self.closed = False

    def put(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> list:
        while not self._items and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class Handoff:
    """Carries items from any thread to ``Mailbox``es on ``aio``, one wake-up per burst."""

    def __init__(self, aio: asyncio.AbstractEventLoop):
        self._aio = aio
        self._pending: collections.deque = collections.deque()
        self._scheduled = False

    def post(self, mailbox: Mailbox, item: Any) -> None:
        """Any thread: ``item`` reaches ``mailbox.put`` on the event loop, after every item posted
        before it (raises ``RuntimeError`` once the event loop is closed)."""
        self._pending.append((mailbox, item))  # (deque.append is atomic under the GIL)
        if not self._scheduled:
            # Append, then test: a flush clears the flag before it drains, so an item appended while
            # the flag was still set is drained by that flush.
            self._scheduled = True
            try:
                self._aio.call_soon_threadsafe(self._flush)
            except RuntimeError:
                self._scheduled = False
                raise

    def _flush(self) -> None:
        self._scheduled = False
        pending = self._pending
        while pending:
            mailbox, item = pending.popleft()
            mailbox.put(item)


def merge(batch: list[tuple[int, RequestOutput]]) -> list[tuple[int, RequestOutput]]:
    """Joins each index's consecutive outputs in ``batch`` into one (tokens in order, the finish
    reason of the last), in the order of their first output. An abnormal ending (abort, rejected,
    error) stays an output of its own, so the tokens before it are still sent before the error."""
    if len(batch) <= 1:
        return batch
    out_list: list[tuple[int, RequestOutput]] = []
    last: dict[int, int] = {}  # index -> position of its latest output in out_list
    for i, out in batch:
        at = last.get(i)
        if at is not None and not out_list[at][1].finished and out.finish_reason in _JOINABLE:
            prev = out_list[at][1]
            out_list[at] = (i, RequestOutput(out.request_id, prev.token_ids + out.token_ids, out.finish_reason, out.error))
        else:
            last[i] = len(out_list)
            out_list.append((i, out))
    return out_list


_JOINABLE = (None, "stop", "length")  # endings that ride on the last tokens' chunk
