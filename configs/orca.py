"""orca: Orca iteration-level scheduling with full KV reservation."""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/orca"
    c.scheduler.name = "orca"
    return c
