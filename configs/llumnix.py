"""llumnix: Llumnix (OSDI'24) on 16 simulated instances: LLaMA-2-7B, one NVIDIA L4 (24 GB) each —
the closest entry of the hardware table to the paper's A10 (24 GB; same memory, so about the same
KV pool per instance: a few hundred blocks, real memory pressure) — vLLM scheduling, Llumnix's
freeness dispatch and live migration, bursty Gamma arrivals (CV 2) with ShareGPT lengths
(Vidur's processed ShareGPT, LLaMA-2 tokenizer, filtered to the 4096-token context).

``experiments/llumnix_migration.py`` runs it with migration off / live / recompute at a few rates,
measures migration downtime against sequence length and compares a high-priority class with and
without Llumnix's headroom. One run from the CLI::

    python -m jaxserve.experiment --config=configs/llumnix.py
    python -m jaxserve.experiment --config=configs/llumnix.py --config.cluster.migration.mode=off

Needs ``../shared/traces`` (or ``$JAXSERVE_TRACES``) for the ShareGPT lengths; ShareGPT rows longer
than the context are rejected and counted (the experiment filters them out beforehand).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/llumnix"
    c.model.name = "llama-2-7b"
    c.hardware.name = "l4"
    c.scheduler.name = "vllm"
    c.workload.kind = "gamma"
    c.workload.cv = 2.0
    c.workload.qps = 20.0
    c.workload.num_requests = 4000
    c.workload.duration_s = None
    c.workload.lengths.kind = "trace"
    c.workload.lengths.path = "vidur_processed/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
    c.cluster.num_replicas = 16
    c.cluster.router = "freeness"
    c.cluster.migration.mode = "live"
    return c
