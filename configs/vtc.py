"""vtc: fair queueing with virtual token counters on top of vLLM batching; two clients."""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/vtc"
    c.scheduler.name = "vtc"
    c.scheduler.base = "vllm"
    c.scheduler.w_p = 1.0
    c.scheduler.w_q = 2.0
    return c
