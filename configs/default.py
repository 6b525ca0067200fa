"""Defaults every experiment config starts from (see DESIGN.md "Configs and experiments").

Every key is declared here once, as ``Key(path, default, help)`` (``python -m jaxserve.experiment
--config_help`` lists them); code that reads a key has no default of its own. Scheduler options
are the exception that proves the rule: ``scheduler_keys`` derives them from the registered
policies, whose dataclass fields hold their defaults (see jaxserve/config.py); only their help is
written here. Override any key on the command line: --config.scheduler.chunk_size=256
--config.workload.qps=4 (``none`` unsets an optional key).
"""

from ml_collections import ConfigDict

from jaxserve.config import Key, build_config, scheduler_keys

GENERAL = (
    Key("backend", "sim", '"sim" (the discrete-event simulator) | "engine" (a real jit-compiled model from model.path)'),
    Key("output_dir", "outputs/default", "where metrics.json, requests.csv and the plots are written"),
    Key("seed", 0, "engine sampling seed; the profiled cost model's jitter seed (workload.seed seeds the workload)"),
    Key("model.name", "llama-3-8b", "simulated model: a key of jaxserve.sim.models.MODELS (sim backend; its 8192-token context holds every request of the default trace)"),
    Key("model.path", "", "local Hugging Face checkpoint directory (engine backend)"),
    Key("model.dtype", "bf16", "simulated weight and KV dtype of the roofline cost model (sim backend)"),
    Key("model.max_context", 0, "longest prompt + output served; 0: the model's max_position_embeddings (engine: at most 4096)"),
    Key("hardware.name", "a100-80gb", "simulated accelerator: a key of jaxserve.sim.hardware.HARDWARE (roofline only; profiled runs model the profile's machine)"),
    Key("hardware.tp", 1, "tensor-parallel degree of the simulated replica"),
    Key("hardware.pp", 1, "pipeline-parallel degree of the simulated replica"),
    Key("hardware.mfu", None, "model FLOPs utilization; unset: the hardware table's cited efficiency", float),
    Key("hardware.mbu", None, "memory bandwidth utilization; unset: the hardware table's cited efficiency", float),
    Key("hardware.step_overhead_s", None, "fixed CPU time per step; unset: the cost model's 4 ms (vLLM's measured bubble)", float),
    Key("hardware.frequency_mhz", None, "SM clock of the simulated GPUs, MHz (one the hardware supports: jaxserve.sim.hardware dvfs); unset: the top clock", int),
    Key("hardware.power_cap_w", None, "per-GPU power cap, watts (nvidia-smi -pl): a step's clock drops until its busy power fits; unset: TDP", float),
)

SCHEDULER_NAME = Key("scheduler.name", "vllm", "the policy: jaxserve.scheduler.available() (static, orca, vllm, sarathi, vtc, ...)")

# Help for the derived scheduler options (jaxserve/config.py adds which policies take each one).
SCHEDULER_HELP = {
    "max_num_seqs": "most requests in the running batch",
    "enable_prefix_caching": "reuse cached full KV blocks across requests",
    "preemption_mode": '"recompute" (free the victim\'s blocks) | "swap" (copy its KV to kv.num_host_blocks)',
    "watermark": "fraction of KV blocks admission keeps free while other requests run",
    "max_num_batched_tokens": "token budget of a step; a whole prompt must fit it",
    "chunk_size": "token budget of a step, prefills split into chunks to fit it (Sarathi-Serve)",
    "chunk_align": "prefill chunks are a multiple of this many tokens (except a prompt's last)",
    "base": 'the batching policy under the fair queue: "vllm" | "sarathi"',
    "w_p": "VTC weight of a prompt token in a client's service",
    "w_q": "VTC weight of a generated token in a client's service",
}

RESOURCES = (
    Key("kv.block_size", 16, "tokens per KV block"),
    Key("kv.num_blocks", 0, "KV blocks on the device; 0: what fits (sim: kv.memory_fraction; engine: engine.kv_cache_gb)"),
    Key("kv.memory_fraction", 0.9, "sim: fraction of device memory for weights + KV when kv.num_blocks is 0 (vLLM's gpu_memory_utilization)"),
    Key("kv.num_host_blocks", 0, "host (CPU) KV blocks for preemption_mode='swap'"),
)

WORKLOAD = (
    Key("workload.kind", "trace", '"trace" (replay trace_path) | "poisson" | "gamma" | "fixed" (synthetic arrivals at qps)'),
    # "sample:<file>" ships with jaxserve (jaxserve/workload/samples), so a fresh clone runs as is.
    Key("workload.trace_path", "sample:azure_conv_2023_first_10min.csv",
        "kind='trace': the trace file; 'sample:<file>': shipped with jaxserve (the Azure 2023 conversation trace's "
        "first 10 min); a relative path: under $JAXSERVE_TRACES, else ../shared/traces"),
    Key("workload.trace_format", "auto", '"auto" (detect) | "azure" | "vidur" | "lengths" | "mooncake"'),
    Key("workload.qps", None, "arrival rate (req/s); a trace replays at its recorded rate when unset, rescaled to qps when set", float),
    Key("workload.cv", 1.0, "kind='gamma': coefficient of variation of the inter-arrival gaps"),
    Key("workload.num_requests", 1000, "synthetic kinds: how many requests (cut a trace with max_requests)"),
    Key("workload.seed", 0, "seed of arrivals and sampled lengths (and of the engine's random prompt ids)"),
    Key("workload.time_scale", 1.0, "multiply a trace's arrival gaps (< 1: faster); not with qps"),
    Key("workload.start_s", 0.0, "keep requests arriving from this second on (source time)"),
    Key("workload.duration_s", 600.0, "keep requests arriving within this many seconds of start_s (the first 10 min: a fast default); none: all",
        optional=True),
    Key("workload.max_requests", None, "keep at most this many requests; unset: no limit", int),
    Key("workload.client_id", "default", "client of every request (request ids are '<client_id>-<row>')"),
    Key("workload.clients", "", "several clients: 'A:1,B:2' draws each request's client by weight (B sends twice A's rate); \"\": every request is workload.client_id's"),
    Key("workload.lengths.kind", "trace", '"trace" (the trace\'s own lengths, or lengths.path\'s) | "fixed" | "uniform" | "zipf"'),
    Key("workload.lengths.prompt_len", 512, "lengths.kind='fixed': prompt tokens"),
    Key("workload.lengths.output_len", 128, "lengths.kind='fixed': output tokens"),
    Key("workload.lengths.low", 32, "lengths.kind='uniform'/'zipf': shortest length (prompt and output)"),
    Key("workload.lengths.high", 2048, "lengths.kind='uniform'/'zipf': longest length (prompt and output)"),
    Key("workload.lengths.a", 1.2, "lengths.kind='zipf': the exponent"),
    Key("workload.lengths.path", None, "a length-only CSV to sample (prompt, output) pairs from, e.g. vidur_processed/sharegpt_8k_...csv", str),
)

CLUSTER = (
    Key("cluster.num_replicas", 1, "replicas at the start (simulator); each has the replica keys above unless cluster.replicas overrides them"),
    Key("cluster.router", "round_robin", "where requests go: jaxserve.cluster.routers.available() (round_robin, shortest_queue, least_kv, prefix_affinity, freeness, fair)"),
    Key("cluster.router_options", "", "the router's options, 'name=value,...' (e.g. fair: 'max_waiting=4,w_q=1')"),
    Key("cluster.replicas", "", "per-replica overrides of model/hardware/scheduler/kv keys: '1:hardware.name=h100-sxm,scheduler.name=sarathi;2:kv.num_blocks=2000'"),
    Key("cluster.events", "", "cluster events: 'fail:2@30,drain:1@60,remove:3@90,add@120' (kind[:replica]@seconds; add builds a replica from the base keys)"),
    Key("cluster.migration.mode", "off", '"off" | "live" (Llumnix: KV copied in stages while decoding, only the last stage pauses) | "recompute" (abort, recompute elsewhere)'),
    Key("cluster.migration.interval_s", 0.25, "how often the migration policy looks at the cluster (s)"),
    Key("cluster.migration.source_below", 0.0, "a replica whose Llumnix freeness (free blocks per running request, queued demand counted) is below this gives requests away"),
    Key("cluster.migration.destination_above", 8.0, "a replica whose freeness is above this takes migrated requests"),
    Key("cluster.migration.headroom_blocks", 0, "virtual blocks each high-priority request (priority < 0) adds to its replica's usage (Llumnix priority isolation)"),
    Key("cluster.migration.link", "infiniband-hdr", "link KV crosses: nvlink3 | pcie4 | infiniband-hdr | ethernet-100g | ethernet-25g (jaxserve/cluster/migration.py, with sources)"),
    Key("cluster.migration.max_stages", 8, "live: most copy stages before the last (pausing) one"),
    Key("cluster.migration.final_stage_blocks", 1, "live: the last stage starts once at most this many full blocks are left to copy"),
    Key("cluster.pools.prefill", 0, "phase pools (DistServe, Splitwise): replicas 0..prefill-1 compute prompts and hand requests over to decode replicas"),
    Key("cluster.pools.decode", 0, "phase pools: the next this-many replicas only decode handed-over requests; the rest of cluster.num_replicas are mixed (both phases; a handoff goes there when no decode replica has room)"),
    Key("cluster.pools.prefill_overrides", "", "replica keys of every prefill replica: 'hardware.tp=2,scheduler.name=sarathi' (cluster.replicas overrides them per replica)"),
    Key("cluster.pools.decode_overrides", "", "replica keys of every decode replica: 'hardware.name=a100-80gb,kv.num_blocks=4000'"),
    Key("cluster.pools.link", "infiniband-hdr", "link the KV crosses from prefill to decode: nvlink3 | nvlink4 | pcie4 | infiniband-hdr | infiniband-ndr | ethernet-100g | ethernet-25g (jaxserve/cluster/kv_transfer.py, with sources)"),
    Key("cluster.pools.link_gb_s", None, "the link's bandwidth in GB/s (one way, per GPU), instead of the named link's", float),
    Key("cluster.pools.link_scope", "source", '"source" (a link per prefill replica) | "cluster" (one link every transfer queues on)'),
    Key("cluster.pools.overlap", "none", '"none" (the KV is sent after the prefill step) | "layer" (layer by layer, under the prefill step)'),
    Key("cluster.pools.decode_pick", "least_kv", 'which decode replica takes a handoff: "least_kv" (lowest KV usage) | "shortest_queue" (fewest requests)'),
)

RUN = (
    Key("slo.ttft_s", None, "time-to-first-token target for slo_attainment; unset: no target", float),
    Key("slo.tpot_s", None, "time-per-output-token target for slo_attainment; unset: no target", float),
    Key("sim.max_time_s", None, "stop after this many simulated (engine: measured) seconds; unset: until every request is served", float),
    Key("sim.fast_loop", True, "run vllm/sarathi (FCFS, no prefix cache, recompute, roofline) on the simulator's fast loop, whose event log equals the general loop's bit for bit; False: always the general loop (jaxserve/sim/fast_loop.py)"),
    Key("sim.cost_model", "roofline", '"roofline" | "profiled": step times fitted to sim.profile (its model and machine, not model.name/hardware.name)'),
    Key("sim.profile", None, "profile JSON from python -m jaxserve.profile (sim.cost_model='profiled')", str),
    # "profiled" only: scale each step by a jitter factor drawn (by a hash of its shape) from the
    # profile's repeats, so tail latencies see the machine's measured step-time scatter.
    Key("sim.profile_jitter", False, "sim.cost_model='profiled': scale steps by the profile's measured step-time scatter"),
    Key("sim.async_scheduling", False, "roofline: the host builds step N+1 while the device runs step N, so a step costs max(host, device) instead of host + device (NanoFlow, vLLM's async scheduler)"),
    Key("sim.nano_batches", 1, "roofline: split each step into this many nano-batches whose GEMMs, attention and collectives overlap (NanoFlow's overlap-aware cost model; 1: unsplit; experiments/nanoflow_throughput.py searches it)"),
    Key("sim.nano_memory_share", 0.1, "sim.nano_batches > 1: share of the SMs the attention (memory-bound) kernels run on while they overlap the GEMMs"),
    Key("sim.nano_network_share", 0.1, "sim.nano_batches > 1: share of the SMs the collectives (network-bound) run on; > 0 when hardware.tp > 1"),
    Key("engine.dtype", "auto", '"auto" (the checkpoint\'s torch_dtype) | "float32" | "bfloat16" | "float16"'),
    Key("engine.attention", "auto", '"auto" | "grouped" (chunked jnp, CPU) | "ragged" (Pallas, GPU/TPU)'),
    Key("engine.block_rows", 32, "prefill rows per block (chunks are padded to whole blocks)"),
    Key("engine.kv_cache_gb", 0.5, "KV pool size (GB) when kv.num_blocks is 0"),
    Key("engine.warmup", False, "compile every reachable step shape before serving; False: each on first use (step times exclude compiles either way)"),
    Key("engine.compile_cache", "~/.cache/jaxserve/xla", "jax's persistent compilation cache directory (a rerun loads instead of compiling); \"\": off"),
    Key("engine.max_compiled_shapes", 0, "most step shapes kept compiled (each maps ~260 memory sections); 0: from the host's vm.max_map_count"),
    Key("engine.nano_batches", 1, "engine: split each step's rows into this many nano-batches whose attention may overlap other nano-batches' GEMMs and collectives (NanoFlow; the same logits); 1: off; not with parallel.esp"),
    Key("engine.async_scheduling", False, "engine: the host schedules and packs step N+1 while the device runs step N (vLLM's async scheduling; the same tokens; step times are then intervals between steps' tokens); not with parallel.esp"),
    Key("parallel.tp", 1, "engine: tensor-parallel devices (Megatron: heads, MLP width, vocabulary and KV heads split; must divide the device count and the model's heads); engine.kv_cache_gb is per device"),
    Key("parallel.sp", 1, "engine: devices a step's token rows are split over for the projections and MLP (attention and the KV cache replicated over them); parallel.sp x parallel.tp must divide the device count"),
    Key("parallel.first_device", 0, "engine: index of the first of the runner's tp x sp devices in jax.devices() (engine clusters lay their replicas out one after another from it)"),
    Key("parallel.esp", False, "engine: LoongServe's elastic sequence parallelism over parallel.sp devices (tp = 1): a KV pool per device, long prefills over several devices written into the pages that decode them, multi-master decode; kv.num_blocks counts all devices' pages"),
    Key("parallel.esp_prefill_tokens_per_device", 1024, "engine, parallel.esp: prompt tokens each prefill device takes (a prompt this long or shorter is prefilled on one device)"),
    Key("parallel.esp_decode_pages_per_device", 0, "engine, parallel.esp: most pages of one request a device is planned to hold (0: as many as it has free); smaller spreads a long request's decode over more devices"),
)


# LoongServe (jaxserve/cluster/esp_*.py): one node of elastic instances instead of replicas.
ESP = (
    Key("cluster.esp.enabled", False, "serve on one node of elastic instances with LoongServe's elastic sequence parallelism (the model/hardware/kv keys describe one instance) instead of replicas"),
    Key("cluster.esp.num_instances", 8, "instances on the node (each hardware.tp GPUs), linked by the hardware's interconnect"),
    Key("cluster.esp.max_prefill_requests", 64, "most pending prompts one scheduling round admits (bounds the batching DP, O(n^2 x instances^2))"),
)


def keys() -> tuple[Key, ...]:
    """Every declared key, in the order --config_help lists them."""
    return GENERAL + (SCHEDULER_NAME, *scheduler_keys(SCHEDULER_HELP)) + RESOURCES + WORKLOAD + CLUSTER + ESP + RUN


def get_config() -> ConfigDict:
    return build_config(keys())
