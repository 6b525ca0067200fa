"""vllm: vLLM PagedAttention scheduling (prefill-prioritizing, preemption by recompute)."""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/vllm"
    c.scheduler.name = "vllm"
    return c
