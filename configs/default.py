"""Defaults every experiment config starts from (see DESIGN.md "Configs and experiments").

Override any key on the command line: --config.scheduler.chunk_size=256 --config.workload.qps=4.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.backend = "sim"  # "sim" | "engine"
    c.output_dir = "outputs/default"
    c.seed = 0

    c.model = ConfigDict()
    c.model.name = "llama-2-7b"  # jaxserve.sim.models.MODELS (sim) ...
    c.model.path = ""  # ... or a local HF checkpoint directory (engine)
    c.model.dtype = "bf16"
    c.model.max_context = 0  # 0: the model's max_position_embeddings

    c.hardware = ConfigDict()
    c.hardware.name = "a100-80gb"  # jaxserve.sim.hardware
    c.hardware.tp = 1
    c.hardware.pp = 1
    c.hardware.mfu = placeholder(float)  # unset: the hardware table's cited efficiency
    c.hardware.mbu = placeholder(float)
    c.hardware.step_overhead_s = placeholder(float)  # unset: 4 ms (vLLM's measured CPU bubble)

    c.scheduler = ConfigDict()  # every key but name is passed to jaxserve.scheduler.make
    c.scheduler.name = "vllm"
    c.scheduler.max_num_seqs = 256

    c.kv = ConfigDict()
    c.kv.block_size = 16
    c.kv.num_blocks = 0  # 0: what fits in memory_fraction of the device after the weights
    c.kv.memory_fraction = 0.9
    c.kv.num_host_blocks = 0

    c.workload = ConfigDict()
    c.workload.kind = "trace"  # "poisson" | "gamma" | "fixed" | "trace"
    # "sample:<file>": shipped with jaxserve (jaxserve/workload/samples: the Azure 2023 conversation
    # trace's first 10 min); a relative path: under $JAXSERVE_TRACES, else ../shared/traces.
    c.workload.trace_path = "sample:azure_conv_2023_first_10min.csv"
    c.workload.trace_format = "auto"
    c.workload.qps = placeholder(float)  # unset: replay at the recorded rate; set: rescale to it
    c.workload.cv = 1.0
    c.workload.num_requests = 1000
    c.workload.seed = 0
    c.workload.time_scale = 1.0
    c.workload.start_s = 0.0
    c.workload.duration_s = 600.0  # seconds of the trace to replay (the first 10 min: a fast default)
    c.workload.max_requests = placeholder(int)  # unset: no limit
    c.workload.client_id = "default"
    c.workload.lengths = ConfigDict()
    c.workload.lengths.kind = "trace"  # "fixed" | "uniform" | "zipf" | "trace" (the trace's own, or path's)
    c.workload.lengths.prompt_len = 512
    c.workload.lengths.output_len = 128
    c.workload.lengths.low = 32
    c.workload.lengths.high = 2048
    c.workload.lengths.a = 1.2
    c.workload.lengths.path = placeholder(str)  # a length-only CSV, e.g. vidur_processed/sharegpt_8k_...csv

    c.slo = ConfigDict()
    c.slo.ttft_s = placeholder(float)  # unset: no target
    c.slo.tpot_s = placeholder(float)

    c.sim = ConfigDict()
    c.sim.max_time_s = placeholder(float)  # unset: until every request is served
    c.sim.cost_model = "roofline"  # "roofline" | "profiled": step times fitted to sim.profile (its model, not model.name)
    c.sim.profile = placeholder(str)  # profile JSON from python -m jaxserve.profile (sim.cost_model="profiled")
    # "profiled" only: scale each step by a jitter factor drawn (by a hash of its shape) from the
    # profile's repeats, so tail latencies see the machine's measured step-time scatter.
    c.sim.profile_jitter = False

    c.engine = ConfigDict()  # backend="engine": a real jit-compiled model from model.path
    c.engine.dtype = "auto"  # "auto": the checkpoint's torch_dtype; or float32 | bfloat16 | float16
    c.engine.attention = "auto"  # "auto" | "grouped" (chunked jnp, CPU) | "ragged" (Pallas on GPU/TPU)
    c.engine.block_rows = 32  # prefill rows per block (chunks are padded to whole blocks)
    c.engine.kv_cache_gb = 0.5  # KV pool size when kv.num_blocks is 0
    c.engine.warmup = True  # compile every step shape before serving (latencies exclude compiles)

    c.cluster = ConfigDict()
    c.cluster.num_replicas = 1
    return c
