"""cluster_routers: the whole Azure 2023 conversation hour at 16x its rate on 16 simulated replicas
(Llama-3-8B, one A100-80GB each, vLLM scheduling with prefix caching) behind one router.

Each replica sees about the trace's own rate (5.5 req/s), which keeps it near capacity (busy
~98 % of the run), so where the router sends a request matters. ``experiments/cluster_routers.py``
runs it once per router (``--config.cluster.router=...``) and adds a Mooncake panel with shared
prefixes. Needs ``../shared/traces`` (or ``$JAXSERVE_TRACES``); ``--config.workload.trace_path=
sample:azure_conv_2023_first_10min.csv`` runs the shipped 10-minute sample instead.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/cluster_routers"
    c.model.name = "llama-3-8b"
    c.hardware.name = "a100-80gb"
    c.scheduler.name = "vllm"
    c.scheduler.enable_prefix_caching = True
    c.workload.trace_path = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
    c.workload.duration_s = None  # the whole hour
    c.workload.time_scale = 1.0 / 16
    c.cluster.num_replicas = 16
    c.cluster.router = "shortest_queue"
    return c
