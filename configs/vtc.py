"""vtc: fair queueing with virtual token counters on top of vLLM batching (scheduler.base, w_p, w_q)."""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/vtc"
    c.scheduler.name = "vtc"
    return c
