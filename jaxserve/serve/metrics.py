"""The server's Prometheus metrics: vLLM's names and meanings with a ``jaxserve:`` prefix, in a
registry of the server's own (so several servers in one process, e.g. in tests, never clash).

Names, meanings, labels (``model_name``, ``engine``) and histogram buckets follow vLLM's v1
Prometheus logger (``vllm/v1/metrics/loggers.py``), so a vLLM dashboard works once ``vllm:`` is
replaced by ``jaxserve:``. Latencies are observed for requests that finished by themselves (stop or
length); ``request_success_total`` counts every ending by ``finished_reason`` (stop, length, abort,
rejected, error). Token counters follow vLLM v1: a request's prompt tokens count once, when its first token
comes; generation tokens count as they are sampled.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from jaxserve.serve.engine_loop import EngineLoop, RequestTimes, StepStats

PREFIX = "jaxserve:"
# vLLM's buckets (vllm/v1/metrics/loggers.py): time to first token, per-output-token times (also
# the inter-token latency), and request-level latencies (e2e, queue, prefill, decode, inference).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# vLLM's request-level latency histograms: key -> (name, documentation). Queue: arrival to first
# scheduled; prefill: first scheduled to first token; decode: first to last token; inference: both.
REQUEST_LATENCIES = {
    "e2e": ("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
    "queue": ("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
    "inference": ("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request."),
    "prefill": ("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request."),
    "decode": ("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request."),
}
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISH_REASONS = ("stop", "length", "abort", "rejected", "error")


def one_two_five_buckets(maximum: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``maximum`` (vLLM's ``build_1_2_5_buckets``, for token counts)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > maximum:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class ServerMetrics:
    """The metrics of one server over one ``EngineLoop`` (an ``engine_loop.Observer``); ``render()``
    is the ``/metrics`` body. Gauges read the loop's snapshot when scraped."""

    def __init__(self, model_name: str, max_model_len: int, loop: EngineLoop):
        self.registry = registry = CollectorRegistry()
        labels = ("model_name", "engine")
        values = (model_name, "0")

        def gauge(name, doc, fn):
            Gauge(PREFIX + name, doc, labels, registry=registry).labels(*values).set_function(fn)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, labels, registry=registry).labels(*values)

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=registry).labels(*values)

        gauge("num_requests_running", "Number of requests in model execution batches.", lambda: loop.snapshot.num_running)
        gauge("num_requests_waiting", "Number of requests waiting to be processed.", lambda: loop.num_waiting)
        gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lambda: loop.snapshot.kv_usage)
        gauge("kv_cache_blocks_used", "KV-cache blocks held by requests (jaxserve's own).", lambda: loop.snapshot.kv_blocks_used)
        self.prefix_queries = counter("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.preemptions = counter("num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        success = Counter(PREFIX + "request_success", "Count of successfully processed requests.",
                          labels + ("finished_reason",), registry=registry)  # fmt: skip
        self.success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        token_buckets = one_two_five_buckets(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKEN_BUCKETS
        )
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram(
            "request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
            TOKEN_LATENCY_BUCKETS,
        )  # fmt: skip
        self.latency = {key: histogram(name, doc, REQUEST_LATENCY_BUCKETS) for key, (name, doc) in REQUEST_LATENCIES.items()}

    # -- engine_loop.Observer (called on the loop's thread) -----------------------------------------
    def on_step(self, stats: StepStats) -> None:
        self.prompt_tokens.inc(stats.new_prompt_tokens)
        self.generation_tokens.inc(stats.generation_tokens)
        self.preemptions.inc(stats.num_preemptions)
        self.prefix_queries.inc(stats.prefix_queries)
        self.prefix_hits.inc(stats.prefix_hits)
        self.iteration_tokens.observe(stats.num_tokens)

    def on_token(self, request_id: str, gap_s: float) -> None:
        self.itl.observe(gap_s)

    def on_finish(self, t: RequestTimes) -> None:
        self.success[t.finish_reason].inc()
        if t.finish_reason not in ("stop", "length") or math.isnan(t.first_token_s):
            return
        self.ttft.observe(t.first_token_s - t.arrival_s)
        spans = {"e2e": (t.arrival_s, t.end_s), "queue": (t.arrival_s, t.scheduled_s),
                 "inference": (t.scheduled_s, t.end_s), "prefill": (t.scheduled_s, t.first_token_s),
                 "decode": (t.first_token_s, t.end_s)}  # fmt: skip
        for key, (start, end) in spans.items():
            self.latency[key].observe(end - start)
        self.request_prompt_tokens.observe(t.prompt_tokens)
        self.request_generation_tokens.observe(t.output_tokens)
        if t.output_tokens > 1:
            self.tpot.observe((t.last_token_s - t.first_token_s) / (t.output_tokens - 1))

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
