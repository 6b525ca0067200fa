"""sarathi: Sarathi-Serve chunked prefills with stall-free batching (chunk_size = token budget)."""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/sarathi"
    c.scheduler.name = "sarathi"
    return c
