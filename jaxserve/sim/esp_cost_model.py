"""Elastic sequence parallelism (LoongServe, shared/PAPERS.md §6) costed on the roofline.

An *instance* is one ``tp``-device replica of a ``RooflineCostModel`` (one GPU at tp=1) on a node
whose instances talk over the node's scale-up link (``hardware.interconnect_bandwidth``: NVLink3
300 GB/s per direction on A100 SXM, cited in ``jaxserve.sim.hardware``, times the roofline's link
efficiency). Two kinds of step:

* **Sequence-parallel prefill** of a batch of whole prompts over ``k`` instances: each instance
  runs the GEMMs of T/k of the T tokens and, with load-balanced (zig-zag) causal ring attention,
  P/k of the P query-key pairs. Its KV block goes round the ring in k-1 hops; hop j is sent while
  the attention over block j is computed, so per layer the attention takes
  ``(k-1)·max(attn/k, hop) + attn/k`` (all layers alike, so the sum over layers has the same form)
  plus a collective latency per hop and layer. HBM traffic: weights, every KV token of the
  sequence read once (T) and the instance's own written (T/k).
* **Multi-master decode** over a group of instances: each request has a master (the instance that
  runs its GEMMs and holds its newest KV) and may hold KV shards on other instances. Every instance
  computes attention over the shards it holds for the group's queries; for each remote shard the
  master sends the query and gets back a partial output and log-sum-exp (``2·q_dim`` activations
  plus a float32 per head, per layer), in one exchange round (2 latencies) per layer. The group
  advances in lockstep, so the step is the slowest instance's.

Both are built from the roofline's own per-unit costs, read through its public ``step`` on probe
plans (``RooflineTerms``), so at k = 1 they equal ``RooflineCostModel.step`` / ``decode_run``
(tests). Energy is not modelled here (``models_energy`` is False): the ring's power draw is not.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from jaxserve.plan import BatchPlan
from jaxserve.sim.cost_model import RooflineCostModel

_PROBE_CONTEXT = 1000  # tokens of the probe plans' prefix / chunk: large enough that differences are exact to ~1e-13


class RooflineTerms(NamedTuple):
    """Seconds per unit on one instance, as the roofline charges them: ``compute`` per new token,
    per sampled row and per query-key pair; ``memory`` for the weights, the LM head, per KV token
    read or written and per token's activations; ``comm`` (tensor-parallel collectives) per token,
    per sampled row and per step; the step's fixed and per-row CPU overheads."""

    compute_per_token: float
    compute_per_sample: float
    compute_per_pair: float
    memory_weights: float
    memory_lm_head: float
    memory_per_kv_token: float
    memory_per_token: float
    comm_per_token: float
    comm_per_sample: float
    comm_fixed: float
    step_overhead: float
    per_seq_overhead: float

    @classmethod
    def of(cls, base: RooflineCostModel) -> "RooflineTerms":
        """Reads the terms off ``base.step`` on four one-row plans (finite differences of its
        compute, memory and comm parts, each linear in the plan's totals)."""
        n = _PROBE_CONTEXT
        one = base.step(_row_plan(0, 1, True, base))  # a decode of a fresh row: 1 token, 1 pair
        quiet = base.step(_row_plan(0, 1, False, base))  # the same, not sampling
        prefix = base.step(_row_plan(n, 1, False, base))  # n more KV tokens read, n more pairs
        chunk = base.step(_row_plan(0, n + 1, False, base))  # n more tokens, (n+1)(n+2)/2 - 1 more pairs
        per_pair = (prefix.compute_s - quiet.compute_s) / n
        per_kv = (prefix.memory_s - quiet.memory_s) / n
        more_pairs = (n + 1) * (n + 2) / 2 - 1
        per_token = (chunk.compute_s - quiet.compute_s - per_pair * more_pairs) / n
        act = (chunk.memory_s - quiet.memory_s) / n - 2 * per_kv
        comm_token = (chunk.comm_s - quiet.comm_s) / n
        return cls(
            compute_per_token=per_token,
            compute_per_sample=one.compute_s - quiet.compute_s,
            compute_per_pair=per_pair,
            memory_weights=quiet.memory_s - 2 * per_kv - act,
            memory_lm_head=one.memory_s - quiet.memory_s,
            memory_per_kv_token=per_kv,
            memory_per_token=act,
            comm_per_token=comm_token,
            comm_per_sample=one.comm_s - quiet.comm_s,
            comm_fixed=quiet.comm_s - comm_token,
            step_overhead=base.step_overhead_s,
            per_seq_overhead=base.per_seq_overhead_s,
        )


def _row_plan(computed: int, new: int, samples: bool, base: RooflineCostModel) -> BatchPlan:
    block = 16
    blocks = -(-(computed + new) // block)
    return BatchPlan(request_ids=("probe",), num_computed_tokens=np.array([computed], np.int64),
                     num_new_tokens=np.array([new], np.int64), samples_token=np.array([samples]),
                     block_tables=(tuple(range(blocks)),), token_ids=np.zeros(new, np.int32), block_size=block)  # fmt: skip


class EspCostModel:
    """Sequence-parallel prefill and multi-master decode over ``num_instances`` instances of
    ``base`` on one node (see the module docstring). Seconds; token counts are per request or per
    instance as each method says."""

    def __init__(self, base: RooflineCostModel, num_instances: int = 8):
        if not isinstance(num_instances, int) or isinstance(num_instances, bool) or num_instances < 1:
            raise ValueError(f"num_instances must be an int >= 1, got {num_instances!r}")
        if num_instances > 1 and base.hardware.interconnect_bandwidth is None:
            raise ValueError(f"hardware {base.hardware.name!r} has no interconnect: instances cannot pass KV")
        if base.power_cap_w is not None:
            raise ValueError("the ESP cost model reads the roofline at a fixed clock; unset power_cap_w")
        self.base, self.num_instances = base, num_instances
        self.terms = RooflineTerms.of(base)
        m = base.model
        self.num_layers = m.num_layers
        self.latency_s = base.collective_latency_s
        link = (base.hardware.interconnect_bandwidth or math.inf) * base.link_efficiency  # bytes/s per direction
        # A KV token's bytes on one instance (all layers) over the link: the ring's per-token hop cost.
        self.hop_s_per_token = base.kv_bytes_per_token_device / link
        # One remote shard's exchange per layer: the query out, the partial output and its per-head
        # log-sum-exp (float32) back; all layers.
        exchange_bytes = 2 * (m.num_heads // base.tp) * m.head_dim * base.act_bytes + 4 * (m.num_heads // base.tp)
        self.exchange_s = m.num_layers * exchange_bytes / link

    @property
    def machine(self) -> str:
        return self.base.machine

    @property
    def models_energy(self) -> bool:
        return False

    def cost_usd_per_hour(self) -> float:
        """Price of the node's ``num_instances · tp`` devices, US dollars per hour."""
        return self.base.cost_usd_per_hour() * self.num_instances

    # -- prefill ---------------------------------------------------------------------------------
    def prefill_time_s(self, num_requests: int, tokens: float, pairs: float, k: int) -> float:
        """Seconds to prefill ``num_requests`` whole prompts of ``tokens`` tokens in all and
        ``pairs`` causal query-key pairs (Σ l(l+1)/2) over ``k`` instances, each sampling its first token.
        The three counts may be numpy arrays (one batch per element; the batching DP costs many at once)."""
        if not 1 <= k <= self.num_instances:
            raise ValueError(f"k must be in 1..{self.num_instances}, got {k}")
        t = self.terms
        share, rows = tokens / k, num_requests / k
        attn = t.compute_per_pair * pairs / k
        hop = self.hop_s_per_token * share
        ring = (k - 1) * np.maximum(attn / k, hop) + attn / k  # hop j overlaps the attention over block j
        compute = t.compute_per_token * share + t.compute_per_sample * rows + ring
        memory = t.memory_weights + t.memory_lm_head + t.memory_per_kv_token * (tokens + share) + t.memory_per_token * share
        comm = (t.comm_per_token * share + t.comm_per_sample * rows + t.comm_fixed
                + self.num_layers * (k - 1) * self.latency_s)  # fmt: skip
        return t.step_overhead + t.per_seq_overhead * rows + np.maximum(memory, compute) + comm

    @property
    def model(self):
        """The instances' ``ModelSpec``."""
        return self.base.model

    def prefill(self, prompt_lens, k: int) -> float:
        """``prefill_time_s`` of the prompts ``prompt_lens`` (token counts) over ``k`` instances."""
        lens = np.asarray(prompt_lens, np.float64)
        if not len(lens) or lens.min() < 1:
            raise ValueError("prompt_lens must be one or more lengths >= 1")
        return float(self.prefill_time_s(len(lens), float(lens.sum()), float((lens * (lens + 1) / 2).sum()), k))

    # -- decode ----------------------------------------------------------------------------------
    def decode_time_s(self, masters, kv_tokens, exchanges) -> float:
        """Seconds of one decode step of a group of instances (arrays over them): ``masters[i]``
        requests have instance i as master (their GEMMs, sampling and new token's KV are there),
        ``kv_tokens[i]`` KV tokens of the group's requests are held on i before the step, and
        i takes part in ``exchanges[i]`` remote-shard exchanges (as master or shard holder)."""
        b = np.asarray(masters, np.float64)
        kv = np.asarray(kv_tokens, np.float64)
        x = np.asarray(exchanges, np.float64)
        if not (b.shape == kv.shape == x.shape) or b.ndim != 1 or not len(b):
            raise ValueError("masters, kv_tokens and exchanges must be equal-length 1-d arrays over the group")
        t = self.terms
        busy = b > 0
        compute = (t.compute_per_token + t.compute_per_sample) * b + t.compute_per_pair * (kv + b)
        memory = (np.where(busy, t.memory_weights + t.memory_lm_head, 0.0) + t.memory_per_kv_token * (kv + 2 * b)
                  + t.memory_per_token * b)  # fmt: skip
        comm = (t.comm_per_token + t.comm_per_sample) * b + np.where(busy, t.comm_fixed, 0.0) + self.exchange_s * x
        if x.any():  # queries out and partials back, once per layer
            comm = comm + 2 * self.num_layers * self.latency_s
        per_instance = t.per_seq_overhead * b + np.maximum(memory, compute) + comm
        return t.step_overhead + float(per_instance.max())
