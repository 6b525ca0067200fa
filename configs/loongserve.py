"""loongserve: elastic sequence parallelism (LoongServe, SOSP'24; shared/PAPERS.md §6) on one
simulated node of 8 A100-80GB GPUs serving long contexts.

The paper serves LWM-1M-Text, a Llama-2-7B-shaped model trained to a 1M-token context; here that
is ``llama-2-7b``'s shape with ``model.max_context`` raised to 2^20 tokens (cost depends on shape
and length only). Each instance is one GPU (``hardware.tp=1``: the 7B weights fit with ~120k
tokens of KV beside them), so the node has 8 elastic instances and ~960k KV tokens, and a
prefill can spread over up to 8 GPUs with ring attention over NVLink. Workload: the Mooncake
synthetic trace's first 2 minutes (prompts of 15k tokens on average, up to 191k; needs
``../shared/traces``). ``experiments/loongserve_long_context.py`` compares it with chunked
prefill and with prefill/decode disaggregation on the same 8 GPUs.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/loongserve"
    c.model.name = "llama-2-7b"
    c.model.max_context = 1 << 20  # LWM-1M-Text's context
    c.hardware.name = "a100-80gb"
    c.hardware.tp = 1
    c.workload.kind = "trace"
    c.workload.trace_path = "mooncake_fast25/synthetic_trace.jsonl"
    c.workload.trace_format = "mooncake"
    c.workload.duration_s = 120.0
    c.cluster.esp.enabled = True
    c.cluster.esp.num_instances = 8
    return c
