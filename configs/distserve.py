"""distserve: OPT-13B chatbot serving disaggregated (DistServe, OSDI'24 §6.2) on simulated A100-80GBs.

One prefill replica (TP 2) hands each request over NVLink to one of two decode replicas (TP 1),
DistServe's split of prefill and decode onto different GPUs with their own parallelism, under the
chatbot SLOs (TTFT 0.25 s, TPOT 0.1 s; DistServe Table 1) with Poisson arrivals and ShareGPT lengths
(filtered to OPT's 2048-token context by ``experiments/distserve_goodput.py``; here the shipped
Azure conversation sample's lengths, so a fresh clone runs as is). The placement (prefill/decode TP
and counts) is what ``experiments/distserve_goodput.py``'s placement search picked for a 4-GPU
budget; it also runs the colocated vLLM baseline on the same GPUs (``--config.cluster.pools.prefill=0
--config.cluster.pools.decode=0``).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/distserve"
    c.model.name = "opt-13b"
    c.hardware.name = "a100-80gb"
    c.scheduler.name = "vllm"
    c.workload.kind = "poisson"
    c.workload.qps = 6.0
    c.workload.num_requests = 600
    c.workload.lengths.kind = "trace"
    c.workload.lengths.path = "sample:azure_conv_2023_first_10min.csv"
    c.workload.duration_s = None
    c.model.max_context = 2048
    c.slo.ttft_s = 0.25
    c.slo.tpot_s = 0.1
    c.cluster.num_replicas = 3
    c.cluster.router = "shortest_queue"
    c.cluster.pools.prefill = 1
    c.cluster.pools.decode = 2
    c.cluster.pools.prefill_overrides = "hardware.tp=2"
    c.cluster.pools.link = "nvlink3"  # DistServe places a model's prefill and decode segments in one node
    c.cluster.pools.overlap = "none"  # DistServe sends the KV after the prefill (pulled by the decode side)
    return c
