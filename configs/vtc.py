"""vtc: fair queueing with virtual token counters on top of vLLM batching (scheduler.base, w_p, w_q).

Two clients overload one server (Llama-2-7B on an L4, Poisson 256-in / 256-out requests; B sends
twice A's rate), as in VTC's fairness experiment: the per-client table shows VTC serving both
equally where ``--config.scheduler.name=vllm`` serves them in proportion to their rates (B ~2x A).
The run stops at 300 simulated seconds, while both clients still have requests waiting.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/vtc"
    c.scheduler.name = "vtc"
    c.model.name = "llama-2-7b"
    c.hardware.name = "l4"
    c.workload.kind = "poisson"
    c.workload.qps = 4.5
    c.workload.num_requests = 1200
    c.workload.clients = "A:1,B:2"
    c.workload.lengths.kind = "fixed"
    c.workload.lengths.prompt_len = 256
    c.workload.lengths.output_len = 256
    c.sim.max_time_s = 300.0  # stop while both are still backlogged: service shares show the policy
    return c
