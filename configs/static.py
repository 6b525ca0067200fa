"""static: request-level static batching (the pre-Orca baseline)."""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/static"
    c.scheduler.name = "static"
    return c
