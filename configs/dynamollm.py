"""dynamollm: one pool's instances for one epoch of DynamoLLM (Stojkovic et al., HPCA'25) on
simulated DGX-H100 GPUs: Llama-3-70B, tensor parallel, a set SM clock, Sarathi-style chunked prefill.

DynamoLLM serves a 70B Llama on DGX H100 machines and reconfigures, per pool of requests binned by
length, the instance count, the TP degree and the GPU clock every epoch. ``experiments/
dynamollm_energy.py`` replays a day built from the Azure 2023 conversation trace: each (epoch, pool)
is a run of this config with ``cluster.num_replicas``, ``hardware.tp`` and
``hardware.frequency_mhz`` set by the energy controller (or by the static max-performance baseline)
and the pool's requests of that epoch as the trace. This file's defaults are the baseline's kind of
instance: TP 8 (one DGX H100) at the top clock.

* Llama-3-70B rather than the paper's Llama-2-70B: the same shape (80 layers, hidden 8192, 8 KV
  heads) with an 8192-token context, which holds every request of the conversation trace but one
  (Llama-2's 4096 would reject 8 %, most of the long-prompt pool).
* ``sarathi`` (chunked prefill, 512-token budget): a p99 TBT SLO is a decode-stall bound, and
  vLLM's prefill-first steps would make it the longest prompt's prefill; chunked prefill is vLLM's
  default scheduling since V1.
* Join-the-shortest-queue routing inside a pool (DynamoLLM's pool controller spreads load evenly).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/dynamollm"
    c.model.name = "llama-3-70b"
    c.hardware.name = "h100-sxm"
    c.hardware.tp = 8
    c.scheduler.name = "sarathi"
    c.workload.kind = "trace"
    c.workload.trace_path = "sample:azure_conv_2023_first_10min.csv"
    c.workload.duration_s = None
    c.cluster.num_replicas = 2
    c.cluster.router = "shortest_queue"
    return c
