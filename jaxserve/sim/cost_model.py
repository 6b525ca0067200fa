"""Roofline cost model: a BatchPlan's duration and energy on a model x hardware x parallelism.

Per device and step (shared modelling facts, shared/PAPERS.md):

    compute_s = FLOPs / (peak · mfu)        memory_s = bytes / (bandwidth · mbu)
    duration  = overhead + max(compute_s, memory_s) + comm_s

* FLOPs: GEMMs on every new token (2 · matmul params), the LM head only for rows that sample, and
  attention per row over the prefix already in KV plus the causal chunk (``ModelSpec.attention_flops``).
* Bytes: the layer weights once per step (the LM head only when some row samples; embedding rows
  looked up are negligible), each row's KV (computed + new tokens) read and the new tokens' KV
  written, copy-on-write block copies (read + write), and the GEMMs' activation inputs and outputs.
* Tensor parallelism (tp) splits GEMMs, heads, weights and KV over ``tp`` devices (KV heads are
  replicated when tp > kv_heads, as vLLM does) and adds Megatron all-reduces of the hidden states:
  two per layer (one with parallel attention+MLP, which can sum before reducing), ring cost
  2·(tp−1)/tp · bytes / link bandwidth plus a fixed latency each, and a gather of the logits.
* Pipeline parallelism (pp) is modelled for ONE micro-batch in flight: the step walks the ``pp``
  stages one after another, so its time is ``pp ×`` the (uniform) stage time plus ``pp − 1``
  activation sends. That equals the unsplit compute time: pp buys memory, not latency, and the
  throughput gain of overlapping micro-batches across steps is not modelled.
* KV swaps in the plan move over the host link and are added to ``comm_s``.
* ``step_overhead_s`` (per step) and ``per_seq_overhead_s`` (per row) are the step's *host* time: CPU
  work the device waits on (scheduling, input preparation, sampling and output processing).
  Synchronous scheduling (the default) runs it in series, ``duration = host + device``; with
  ``async_scheduling`` the host builds step N+1 while the device runs step N (NanoFlow §4.2, vLLM's
  async scheduler), ``duration = max(host, device)``. The host time of a busy period's first step
  is then not charged: the runtime knows when the device idles, a cost model does not.
* ``parts(plan)`` gives the same terms by operation class (``StepParts``: dense GEMMs, attention,
  collectives, host), from which the overlap-aware cost model (``overlap_cost_model``) builds its
  nano-batched steps; ``step`` is combined from them, so the two cannot drift apart.

Clock and energy (``jaxserve.sim.power``): ``frequency_mhz`` sets the SM clock (default the top
one), which scales compute throughput and not memory bandwidth; ``power_cap_w`` lets a step's clock
drop further until its busy power fits the cap. Every one of the tp·pp devices draws idle power for
the whole step and, for its busy share (1/pp of busy = max(compute, memory)), dynamic power by phase:
the memory system's share while memory streams, the SM domain's by its activity (full while
computing, partly while stalled on memory) at the clock's V²f scale; overhead and communication count
as idle. Compute-bound prefill thus draws near TDP and memory-bound decode far less, as measured.
Hardware without published power (TPUs, the CPU entry) gives ``energy_j = 0`` and ``models_energy`` False.

``step`` is called ~10^5 times per simulated hour, so it reduces the plan's columns with a few
numpy calls and scalar arithmetic on constants precomputed here; no Python loop over rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from jaxserve.plan import BatchPlan
from jaxserve.sim.hardware import DTYPE_BYTES, HardwareSpec
from jaxserve.sim.power import StepPower
from jaxserve.sim.models import MLP_MATRICES, ModelSpec

# vLLM RFC #6854 (Multi-Step Scheduling): between decode steps the GPU idles ~4 ms (5-13 ms measured)
# waiting on the scheduler, input preparation and output processing of vLLM's Python engine.
DEFAULT_STEP_OVERHEAD_S = 4e-3

# vLLM profiles peak activation memory with a dummy batch of max_num_batched_tokens (8192, DESIGN.md
# defaults) and max_num_seqs (256) rows that sample; kv_capacity_blocks reserves the same by default.
PROFILE_NUM_TOKENS = 8192
PROFILE_NUM_SEQS = 256
LOGIT_BYTES = 4  # logits are materialized in float32 for sampling
_SCALAR_RUN = 16  # decode_run evaluates runs up to this long with Python floats, longer ones with numpy


class StepCost(NamedTuple):
    """Modelled cost of one step. Seconds and joules; ``compute_s``/``memory_s`` are one device's
    critical-path totals (summed over pipeline stages), ``comm_s`` collectives, sends and swaps.
    A NamedTuple because one is built per simulated step (cheaper than a frozen dataclass)."""

    duration_s: float
    energy_j: float
    compute_s: float
    memory_s: float
    comm_s: float


class StepParts(NamedTuple):
    """One device's roofline terms of a step by operation class (NanoFlow's, shared/PAPERS.md §9),
    seconds, summed over layers (and pipeline stages): the dense GEMMs' FLOP time (LM head included)
    and their weight and activation traffic; attention's FLOP time and its KV traffic (prefix and new
    tokens read, new ones written); copy-on-write block copies; the collectives' per-token/per-row
    time and their fixed latencies; KV swaps over the host link; the host's time. Floats, or float64
    arrays (a decode run's steps) where the KV terms vary."""

    gemm_compute_s: float
    attn_compute_s: float
    weights_s: float
    act_s: float
    kv_s: float
    copy_s: float
    comm_s: float
    comm_fixed_s: float
    swap_s: float
    host_s: float


class RooflineCostModel:
    """Roofline step costs of ``model`` on ``tp·pp`` devices of ``hardware``; see the module docstring.

    ``dtype`` sets weight storage and the compute peak used ("bf16", "fp16", "fp8", "int8", "fp32");
    ``kv_dtype`` the KV cache (default ``dtype``). ``mfu``/``mbu``/``link_efficiency``/
    ``collective_latency_s`` default to the hardware's ``efficiency``. ``host_bandwidth`` (bytes/s)
    overrides the hardware's PCIe figure for swaps. ``async_scheduling`` hides the host time under
    the device's (module docstring).
    """

    def __init__(
        self,
        model: ModelSpec,
        hardware: HardwareSpec,
        tp: int = 1,
        pp: int = 1,
        dtype: str = "bf16",
        mfu: float | None = None,
        mbu: float | None = None,
        step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S,
        per_seq_overhead_s: float = 0.0,
        kv_dtype: str | None = None,
        link_efficiency: float | None = None,
        collective_latency_s: float | None = None,
        host_bandwidth: float | None = None,
        frequency_mhz: int | None = None,
        power_cap_w: float | None = None,
        async_scheduling: bool = False,
    ):
        for name, value in (("tp", tp), ("pp", pp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if model.num_heads % tp:
            raise ValueError(f"tp={tp} must divide {model.name}'s {model.num_heads} attention heads")
        if tp > model.num_kv_heads and tp % model.num_kv_heads:
            raise ValueError(f"tp={tp} must be a multiple of {model.name}'s {model.num_kv_heads} KV heads")
        if tp <= model.num_kv_heads and model.num_kv_heads % tp:
            raise ValueError(f"tp={tp} must divide {model.name}'s {model.num_kv_heads} KV heads")
        if pp > model.num_layers:
            raise ValueError(f"pp={pp} exceeds {model.name}'s {model.num_layers} layers")
        if (tp > 1 or pp > 1) and hardware.interconnect_bandwidth is None:
            raise ValueError(f"hardware {hardware.name!r} has no interconnect; tp and pp must be 1")
        kv_dtype = kv_dtype or dtype
        for name, value in (("dtype", dtype), ("kv_dtype", kv_dtype)):
            if value not in DTYPE_BYTES:
                raise ValueError(f"{name} must be one of {sorted(DTYPE_BYTES)}, got {value!r}")
        eff = hardware.efficiency
        mfu = eff.mfu if mfu is None else mfu
        mbu = eff.mbu if mbu is None else mbu
        link = eff.link if link_efficiency is None else link_efficiency
        for name, value in (("mfu", mfu), ("mbu", mbu), ("link_efficiency", link)):
            if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        latency = eff.collective_latency_s if collective_latency_s is None else collective_latency_s
        for name, value in (("step_overhead_s", step_overhead_s), ("per_seq_overhead_s", per_seq_overhead_s),
                            ("collective_latency_s", latency)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

        self.model, self.hardware = model, hardware
        self.tp, self.pp, self.dtype, self.kv_dtype = tp, pp, dtype, kv_dtype
        self.mfu, self.mbu, self.link_efficiency = float(mfu), float(mbu), float(link)
        self.step_overhead_s, self.per_seq_overhead_s = float(step_overhead_s), float(per_seq_overhead_s)
        self.collective_latency_s = float(latency)
        if not isinstance(async_scheduling, bool):
            raise ValueError(f"async_scheduling must be a bool, got {async_scheduling!r}")
        self.async_scheduling = async_scheduling
        self.host_bandwidth = host_bandwidth if host_bandwidth is not None else hardware.host_bandwidth
        if hardware.has_power_model:
            idle_w, dyn_w = hardware.power_idle_w, hardware.power_max_w - hardware.power_idle_w
        else:
            idle_w = dyn_w = 0.0
        self._power = StepPower(hardware.name, idle_w, dyn_w, tp * pp, pp, hardware.dvfs, frequency_mhz, power_cap_w)
        self.frequency_mhz, self.power_cap_w = self._power.frequency_mhz, self._power.power_cap_w

        w_bytes = DTYPE_BYTES[dtype]
        # Activations stay 16-bit under weight quantization (fp8/int8 GEMMs take 16-bit inputs and
        # outputs in vLLM's W8A16 paths); fp32 models run fp32 activations.
        self.act_bytes = 4 if dtype == "fp32" else 2
        # FLOP/s one device sustains at the set SM clock (the ratio is exactly 1.0 at the top clock)
        flops_rate = hardware.peak_flops(dtype) * self.mfu * self._power.clock_ratio
        byte_rate = hardware.memory_bandwidth * self.mbu  # bytes/s one device sustains
        h, L = model.hidden_size, model.num_layers
        self.kv_bytes_per_token_device = model.kv_bytes_per_token(kv_dtype, tp)

        # Seconds per unit, per device, summed over pipeline stages (the step's critical path).
        self._s_per_token_gemm = model.linear_flops_per_token() / tp / flops_rate
        self._s_per_sample_gemm = model.lm_head_flops_per_token() / tp / flops_rate
        self._s_per_attn_pair = 4.0 * L * (model.num_heads // tp) * model.head_dim / flops_rate
        self._s_weights = model.matmul_params * w_bytes / tp / byte_rate
        self._s_lm_head = model.lm_head_params * w_bytes / tp / byte_rate  # read only when a row samples
        self._s_per_kv_token = self.kv_bytes_per_token_device / byte_rate
        # Activation traffic per token per layer: inputs of column-parallel GEMMs and outputs of
        # row-parallel ones are replicated (4·h); the sharded sides (qkv and up/gate outputs, o and
        # down inputs) divide by tp.
        up_out = (MLP_MATRICES[model.mlp] - 1) * model.intermediate_size
        sharded = model.q_dim + 2 * model.kv_dim + up_out + model.q_dim + model.intermediate_size
        self._s_per_token_act = L * (4 * h + sharded / tp) * self.act_bytes / byte_rate
        self._byte_rate = byte_rate

        # Communication, per step: all-reduces scale with tokens, the logit gather with sampled rows.
        self._s_per_token_comm = 0.0
        self._s_per_sample_comm = 0.0
        self._comm_fixed = 0.0
        if tp > 1:
            link_rate = hardware.interconnect_bandwidth * link
            n_allreduce = L * (1 if model.parallel_attn else 2)
            ring = 2.0 * (tp - 1) / tp
            self._s_per_token_comm += n_allreduce * ring * h * self.act_bytes / link_rate
            self._s_per_sample_comm += (tp - 1) / tp * model.vocab_size * LOGIT_BYTES / link_rate
            self._comm_fixed += (n_allreduce + 1) * self.collective_latency_s
        if pp > 1:
            link_rate = hardware.interconnect_bandwidth * link
            self._s_per_token_comm += (pp - 1) * h * self.act_bytes / link_rate
            self._comm_fixed += (pp - 1) * self.collective_latency_s

        self._devices = tp * pp

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return self._devices

    @property
    def machine(self) -> str:
        """The device's name, for titles (``hardware.name``)."""
        return self.hardware.name

    @property
    def models_energy(self) -> bool:
        """Whether ``energy_j`` is modelled (the hardware has published power figures)."""
        return self.hardware.has_power_model

    def idle_power_w(self) -> float:
        """Watts all tp·pp devices draw while no step runs (0 when power is not modelled)."""
        return self._power.idle_w * self._devices

    def cost_usd_per_hour(self) -> float:
        """On-demand price of the tp·pp devices, US dollars per hour."""
        return self.hardware.price_per_hour_usd * self._devices

    def __repr__(self) -> str:
        return (f"RooflineCostModel({self.model.name}, {self.hardware.name}, tp={self.tp}, pp={self.pp}, "
                f"dtype={self.dtype}, mfu={self.mfu}, mbu={self.mbu}, frequency_mhz={self.frequency_mhz}, "
                f"power_cap_w={self.power_cap_w}, async_scheduling={self.async_scheduling})")

    # -- the step --------------------------------------------------------------------------------
    def step(self, plan: BatchPlan) -> StepCost:
        """Cost of executing ``plan``. An empty plan costs nothing (idle time between steps is the
        simulator's to charge, at ``idle_power_w``)."""
        if not len(plan.num_new_tokens):
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0)
        return StepCost(*self.combine(self.parts(plan), max))

    def parts(self, plan: BatchPlan) -> StepParts:
        """``plan``'s terms by operation class (``StepParts``); all zero for an empty plan."""
        n = plan.num_new_tokens
        if not len(n):
            return StepParts(*(0.0,) * len(StepParts._fields))
        c = plan.num_computed_tokens
        tokens = float(plan.num_tokens)  # (cached on the plan; the same integer sum)
        computed = float(np.add.reduce(c))
        # Σ n·(c + (n+1)/2): query-key pairs, causal within each chunk.
        pairs = float(np.dot(n, c)) + 0.5 * (float(np.dot(n, n)) + tokens)
        samples = int(np.count_nonzero(plan.samples_token))
        copy = 0.0
        if plan.copy_blocks:
            copy = 2.0 * len(plan.copy_blocks) * plan.block_size * self.kv_bytes_per_token_device / self._byte_rate
        swap = self._swap_s(plan) if plan.swap_out_blocks or plan.swap_in_blocks else 0.0
        return self._parts(tokens, computed, pairs, samples, len(n), copy, swap)

    def _parts(self, tokens: float, computed, pairs, samples: int, rows: int, copy: float, swap: float) -> StepParts:
        """The terms from a plan's totals; ``computed`` and ``pairs`` may be float64 arrays (a run)."""
        return StepParts(
            gemm_compute_s=tokens * self._s_per_token_gemm + samples * self._s_per_sample_gemm,
            attn_compute_s=pairs * self._s_per_attn_pair,
            weights_s=self._s_weights + (self._s_lm_head if samples else 0.0),
            act_s=tokens * self._s_per_token_act,
            kv_s=(computed + 2.0 * tokens) * self._s_per_kv_token,  # read prefix + new, write new
            copy_s=copy,
            comm_s=tokens * self._s_per_token_comm + samples * self._s_per_sample_comm,
            comm_fixed_s=self._comm_fixed,
            swap_s=swap,
            host_s=self.step_overhead_s + rows * self.per_seq_overhead_s,
        )

    def combine(self, p: StepParts, maximum) -> tuple:
        """``(duration, energy, compute, memory, comm)`` of the unsplit step (compute and HBM
        traffic overlapped as the roofline assumes, collectives in series, then the host: in series,
        or hidden under the device with async scheduling). ``maximum`` is ``max`` for floats,
        ``np.maximum`` for a run's arrays: the same operations either way, so equal bit for bit."""
        compute = p.gemm_compute_s + p.attn_compute_s
        memory = p.weights_s + p.kv_s + p.act_s
        if p.copy_s:
            memory += p.copy_s
        comm = p.comm_s + p.comm_fixed_s
        if p.swap_s:
            comm += p.swap_s
        compute, scale = self._power.clocked(compute, memory)  # a power cap may lower the clock
        busy = maximum(memory, compute)
        if self.async_scheduling:
            duration = maximum(p.host_s, busy + comm)
        else:
            duration = p.host_s + busy + comm
        energy = self._power.energy(duration, busy, compute, memory, scale)  # each device busy busy / pp
        return duration, energy, compute, memory, comm

    def totals_cost(self, tokens: float, computed: float, pairs: float, samples: int, rows: int) -> tuple[float, float]:
        """``combine(parts_from_totals(tokens, computed, pairs, samples, rows), max)``'s duration and
        energy from scalars, without the intermediate tuples (the simulator's fast loop costs every
        step this way): the same operations in the same order, so equal bit for bit."""
        compute = (tokens * self._s_per_token_gemm + samples * self._s_per_sample_gemm) + pairs * self._s_per_attn_pair
        memory = ((self._s_weights + (self._s_lm_head if samples else 0.0)) + (computed + 2.0 * tokens) * self._s_per_kv_token
                  + tokens * self._s_per_token_act)  # fmt: skip
        comm = (tokens * self._s_per_token_comm + samples * self._s_per_sample_comm) + self._comm_fixed
        power = self._power
        compute, scale = power.clocked(compute, memory)
        busy = max(memory, compute)
        host = self.step_overhead_s + rows * self.per_seq_overhead_s
        duration = max(host, busy + comm) if self.async_scheduling else host + busy + comm
        return duration, power.energy(duration, busy, compute, memory, scale)

    def parts_from_totals(self, tokens: float, computed, pairs, samples: int, rows: int) -> StepParts:
        """``parts`` of a step without copies or swaps from its plan's totals: new tokens, their
        prefix context, ``pairs`` = Σ n·c + (Σ n² + Σ n)/2 over the rows, sampling rows and rows."""
        return self._parts(tokens, computed, pairs, samples, rows, 0.0, 0.0)

    def decode_parts(self, num_rows: int, computed) -> StepParts:
        """``parts`` of a decode step of ``num_rows`` rows whose contexts sum to ``computed`` (a
        float, or a float64 array of a run's steps), equal to ``parts`` of its plan bit for bit."""
        pairs = computed + 0.5 * (float(num_rows) + float(num_rows))  # Σ n·c + (Σ n² + Σ n)/2 with n = 1
        return self._parts(float(num_rows), computed, pairs, num_rows, num_rows, 0.0, 0.0)

    def decode_run(self, num_rows: int, context_tokens: int, max_context: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Durations and energies of ``k`` consecutive decode steps of the same ``num_rows`` rows
        whose contexts sum to ``context_tokens`` at the first step (each step adds ``num_rows``);
        ``max_context`` (the longest row's) is part of the protocol for cost models that need it
        (``ProfiledCostModel``), not of the roofline's.

        Element j equals ``step(plan_j).duration_s`` / ``.energy_j`` bit for bit: the same
        expressions in the same order, evaluated for all j at once (the simulator's fast path)."""
        # A short run, or one whose clock a power cap picks step by step: scalar arithmetic (it beats
        # two dozen numpy calls on tiny arrays).
        if k <= _SCALAR_RUN or self._power.capped:
            costs = [self.combine(self.decode_parts(num_rows, float(context_tokens + num_rows * j)), max)
                     for j in range(k)]  # fmt: skip
            return np.array([c[0] for c in costs], np.float64), np.array([c[1] for c in costs], np.float64)
        computed = (context_tokens + num_rows * np.arange(k, dtype=np.int64)).astype(np.float64)
        duration, energy, *_ = self.combine(self.decode_parts(num_rows, computed), np.maximum)
        return duration, energy

    def _swap_s(self, plan: BatchPlan) -> float:
        if self.host_bandwidth is None:
            raise ValueError(
                f"plan swaps KV blocks but hardware {self.hardware.name!r} has no published host-link bandwidth; "
                "pass host_bandwidth= (bytes/s) to RooflineCostModel"
            )
        blocks = len(plan.swap_out_blocks) + len(plan.swap_in_blocks)
        # Each stage's devices move their own layers' shard in parallel, so one device's share counts.
        block_bytes = plan.block_size * self.kv_bytes_per_token_device / self.pp
        return blocks * block_bytes / self.host_bandwidth

    # -- memory ----------------------------------------------------------------------------------
    def activation_reserve_bytes(self, num_tokens: int = PROFILE_NUM_TOKENS, num_seqs: int = PROFILE_NUM_SEQS) -> int:
        """Peak activation bytes on one device for a step of ``num_tokens`` tokens, ``num_seqs`` of
        which sample: the MLP's live tensors (residual and normed input, up/gate and activation
        outputs, sharded by tp) plus float32 logits of the sampled rows (vocab-parallel)."""
        m = self.model
        mlp_live = MLP_MATRICES[m.mlp] * m.intermediate_size // self.tp  # (gate+)up output + activation
        per_token = (2 * m.hidden_size + mlp_live) * self.act_bytes
        logits = min(num_tokens, num_seqs) * (m.vocab_size // self.tp) * LOGIT_BYTES
        return num_tokens * per_token + logits

    def kv_capacity_blocks(
        self,
        block_size: int,
        gpu_memory_utilization: float = 0.9,
        activation_reserve_bytes: int | None = None,
    ) -> int:
        """KV blocks of ``block_size`` tokens that fit, as vLLM sizes its cache: per device,
        memory · utilization − its weight shard − the activation reserve, divided by one block's
        per-device KV bytes (heads split over tp, layers over pp; the largest stage binds).
        ``ValueError`` when the weights (plus reserve) do not fit."""
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        if activation_reserve_bytes is None:
            activation_reserve_bytes = self.activation_reserve_bytes()
        m, hw = self.model, self.hardware
        stage_layers = -(-m.num_layers // self.pp)
        weights = m.weight_bytes(self.dtype) / (self.tp * self.pp)
        budget = hw.memory_bytes * gpu_memory_utilization
        free = budget - weights - activation_reserve_bytes
        block_bytes = block_size * m.kv_bytes_per_token(self.kv_dtype, self.tp, stage_layers)
        if free < block_bytes:
            raise ValueError(
                f"{m.name} ({self.dtype}) does not fit on {self.tp * self.pp} x {hw.name} "
                f"(tp={self.tp}, pp={self.pp}): "
                f"{weights / 1e9:.1f} GB of weights + {activation_reserve_bytes / 1e9:.1f} GB activations per device "
                f"vs {budget / 1e9:.1f} GB usable ({gpu_memory_utilization:.0%} of {hw.memory_bytes / 1e9:.1f} GB); "
                "raise tp/pp or use a smaller dtype"
            )
        return int(free // block_bytes)
