"""The real-time engine loop on a fake executor: requests from many threads join the running batch,
stream their tokens in order, end exactly once; aborts free blocks; a request refused late or whose
step raises ends with an error while the others go on; queue limit, draining and stopping."""

from __future__ import annotations

import threading
import time

import pytest
from loop_testing import Collector, CountingExecutor, expected, request

from jaxserve import scheduler as schedulers
from jaxserve.kv.config import KVConfig
from jaxserve.serve.engine_loop import Draining, EngineLoop, QueueFull

KV = KVConfig(num_blocks=64, block_size=4)


def make_loop(executor=None, scheduler="sarathi", **kw):
    options = {"max_num_seqs": 4, "chunk_size": 8} if scheduler == "sarathi" else {"max_num_seqs": 4}
    return EngineLoop(schedulers.make(scheduler, **options), KV, executor or CountingExecutor(), max_context=128, **kw)


@pytest.mark.parametrize("scheduler", ["sarathi", "vllm", "orca"])
def test_requests_from_many_threads_join_the_batch_and_stream_in_order(scheduler):
    loop = make_loop(scheduler=scheduler).start()
    prompts = {f"r{i}": [(3 * i + j) % 40 for j in range(5 + 3 * i)] for i in range(8)}
    sinks = {rid: Collector() for rid in prompts}
    first = Collector()
    loop.submit(request("first", [7] * 9, 100), first)  # running while the others arrive
    while not first.tokens:
        time.sleep(0.001)

    def client(rid, delay):
        time.sleep(delay)
        loop.submit(request(rid, prompts[rid], 12), sinks[rid])

    threads = [threading.Thread(target=client, args=(rid, 0.002 * i)) for i, rid in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rid, sink in {**sinks, "first": first}.items():
        sink.wait()
        assert sink.tokens == expected(prompts.get(rid, [7] * 9), 100 if rid == "first" else 12)
        assert sink.last.finish_reason == "length" and sink.last.error is None
        assert all(not o.finished for o in sink.outputs[:-1])
    loop.stop()
    frozen = loop.log.freeze()
    assert frozen.step_seqs.max() >= 2  # requests arriving while "first" ran joined its batch
    assert loop.snapshot.kv_blocks_used == 0 and loop.snapshot.num_unfinished == 0 and loop.queued_tokens == 0
    assert not loop.executor.registered  # every request released from the executor
    # Arrivals are stamped on the loop's clock; the log's times are that clock's.
    assert (frozen.first_scheduled_s >= frozen.arrival_s).all() and (frozen.finish_s <= loop.now()).all()


def test_stop_tokens_end_a_request_with_stop():
    loop = make_loop().start()
    sink = Collector()
    loop.submit(request("s", [10, 11], 20, stop_token_ids=(15,)), sink)
    assert sink.wait().tokens == [12, 13, 14, 15] and sink.last.finish_reason == "stop"
    loop.stop()


def test_abort_mid_stream_frees_blocks_and_the_others_finish():
    loop = make_loop(CountingExecutor(step_s=0.005)).start()
    long, short = Collector(), Collector()
    loop.submit(request("long", [1] * 20, 100), long)
    loop.submit(request("short", [2] * 6, 30), short)
    while len(long.tokens) < 5:
        time.sleep(0.002)
    assert loop.snapshot.kv_blocks_used > 0
    loop.abort("long")
    long.wait()
    assert long.last.finish_reason == "abort" and 5 <= len(long.tokens) < 100
    assert short.wait().tokens == expected([2] * 6, 30)
    loop.abort("long")  # aborting an ended request is a no-op
    loop.abort("never-submitted")
    loop.stop()
    assert loop.snapshot.kv_blocks_used == 0 and not loop.executor.registered and loop.queued_tokens == 0


def test_late_refusals_and_failing_steps_end_only_their_request():
    loop = make_loop(CountingExecutor(poison=45)).start()
    ok, too_long, bad_id, poisoned = Collector(), Collector(), Collector(), Collector()
    loop.submit(request("ok", [1, 2, 3], 40), ok)
    while not ok.tokens:
        time.sleep(0.002)
    loop.submit(request("too-long", [1] * 100, 40), too_long)  # 140 > max_context 128
    loop.submit(request("bad-id", [1, 77], 4), bad_id)  # refused by the executor's register
    loop.submit(request("poisoned", [45, 3], 4), poisoned)  # its first step raises
    for sink, reason, match in (
        (too_long, "rejected", "context 128"), (bad_id, "rejected", "outside the vocabulary"),
        (poisoned, "error", "FloatingPointError"),
    ):  # fmt: skip
        sink.wait()
        assert sink.last.finish_reason == reason and match in sink.last.error and sink.tokens == []
    assert ok.wait().tokens == expected([1, 2, 3], 40) and ok.last.finish_reason == "length"
    # The loop still serves.
    again = Collector()
    loop.submit(request("again", [5], 3), again)
    assert again.wait().tokens == [6, 7, 8]
    loop.stop()
    assert loop.snapshot.kv_blocks_used == 0 and not loop.executor.registered


def test_a_failing_step_of_old_requests_ends_them_and_the_loop_goes_on():
    executor = CountingExecutor(poison=45)
    loop = make_loop(executor).start()
    a = Collector()
    loop.submit(request("a", [40], 30), a)  # generates 41, 42, ... and meets the poison 45 at its 5th step
    a.wait()
    assert a.last.finish_reason == "error" and a.tokens == [41, 42, 43, 44, 45]
    b = Collector()
    loop.submit(request("b", [1], 3), b)
    assert b.wait().tokens == [2, 3, 4]
    loop.stop()


def test_a_sink_that_raises_aborts_its_request_only():
    loop = make_loop().start()
    good = Collector()

    def broken(out):
        raise RuntimeError("client went away")

    loop.submit(request("broken", [1, 2], 50), broken)
    loop.submit(request("good", [3, 4], 10), good)
    assert good.wait().tokens == expected([3, 4], 10)
    assert loop.drain(10.0)
    loop.stop()
    assert loop.snapshot.kv_blocks_used == 0


def test_queue_limit_duplicates_draining_and_stop():
    loop = make_loop(max_queue=2)  # not started: submitted requests stay queued
    loop.submit(request("q0", [1], 2), Collector())
    loop.submit(request("q1", [1], 2), Collector())
    with pytest.raises(QueueFull, match="max_queue=2"):
        loop.submit(request("q2", [1], 2), Collector())
    loop.start()
    assert loop.drain(10.0)
    with pytest.raises(Draining):
        loop.submit(request("late", [1], 2), Collector())
    loop.stop()
    # A stop whose grace runs out aborts what is left.
    loop = make_loop(CountingExecutor(step_s=0.01)).start()
    dup, slow = Collector(), Collector()
    loop.submit(request("slow", [1], 100), slow)
    loop.submit(request("slow", [1], 5), dup)
    assert dup.wait().last.finish_reason == "rejected" and "already being served" in dup.last.error
    loop.stop(grace_s=0.05)
    assert slow.wait().last.finish_reason == "abort" and not loop.running and loop.queued_tokens == 0
    with pytest.raises(ValueError, match="max_queue"):
        make_loop(max_queue=-1)


class Recorder:
    """An observer keeping everything it is told."""

    def __init__(self):
        self.steps, self.gaps, self.finished = [], [], {}

    def on_step(self, stats):
        self.steps.append(stats)

    def on_token(self, request_id, gap_s):
        self.gaps.append(gap_s)

    def on_finish(self, times):
        self.finished[times.request_id] = times


def test_the_observer_sees_tokens_prefix_hits_and_request_times():
    observer = Recorder()
    scheduler = schedulers.make("vllm", max_num_seqs=4, enable_prefix_caching=True)
    loop = EngineLoop(scheduler, KV, CountingExecutor(step_s=0.005), max_context=128, observer=observer).start()
    shared = list(range(1, 13))  # three full blocks of 4
    first, second, stopped = Collector(), Collector(), Collector()
    loop.submit(request("first", shared + [20], 5), first)
    first.wait()
    loop.submit(request("second", shared + [30], 6), second)  # its three prompt blocks are cached
    loop.submit(request("stopped", [1], 120), stopped)
    second.wait()
    while len(stopped.tokens) < 2:
        stopped.done.wait(0.002)
    loop.abort("stopped", "stop")  # (a server found a stop string in its text)
    stopped.wait()
    loop.stop()
    assert stopped.last.finish_reason == "stop"
    n_stopped = len(stopped.tokens)
    assert sum(s.generation_tokens for s in observer.steps) == 5 + 6 + n_stopped
    assert sum(s.new_prompt_tokens for s in observer.steps) == 13 + 13 + 1
    assert sum(s.prefix_queries for s in observer.steps) == 13 + 13 + 1
    assert sum(s.prefix_hits for s in observer.steps) == 12  # the second request's cached blocks
    assert len(observer.gaps) == 4 + 5 + n_stopped - 1 and min(observer.gaps) > 0
    t = observer.finished["second"]
    assert (t.prompt_tokens, t.output_tokens, t.finish_reason) == (13, 6, "length")
    assert t.arrival_s <= t.scheduled_s <= t.first_token_s <= t.last_token_s <= t.end_s
    assert observer.finished["stopped"].finish_reason == "stop"
    assert loop.snapshot.kv_blocks_used == 0 and loop.snapshot.num_running == 0  # (cached blocks are free)


def test_an_executor_that_raises_at_register_ends_only_that_request():
    class Buggy(CountingExecutor):
        def register(self, request):
            if request.request_id == "buggy":
                raise KeyError("a bug")
            super().register(request)

    loop = make_loop(Buggy()).start()
    buggy, fine = Collector(), Collector()
    loop.submit(request("buggy", [1], 3), buggy)
    loop.submit(request("fine", [1], 3), fine)
    assert buggy.wait().last.finish_reason == "error" and "KeyError" in buggy.last.error
    assert fine.wait().tokens == [2, 3, 4]
    loop.stop()
