"""nanoflow: NanoFlow's setup (Zhu et al., arXiv:2408.12757): Llama-2-70B on one 8xA100-80GB node
(TP 8), offline (every request arrives at once), batches formed as NanoFlow forms them.

NanoFlow keeps the dense batch (the tokens a step's GEMMs see) fixed: every running decode plus
chunked prefill up to 2048 tokens a step for the 70B models (its auto-search's global batch,
efeslab/Nanoflow autosearch/search-70.ipynb), which is Sarathi's stall-free batching with a
2048-token budget; the running batch is bounded by the KV cache rather than by a row cap (the same
notebook runs 1280 decodes beside 768 prefill tokens), so ``max_num_seqs`` is set above what fits.
The intra-device overlap and asynchronous scheduling are the cost model's
(``jaxserve.sim.overlap_cost_model``), applied by ``experiments/nanoflow_throughput.py``, which
compares this batch with vLLM's and Sarathi-Serve's on the paper's workloads.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/nanoflow"
    c.model.name = "llama-2-70b"
    c.hardware.name = "a100-80gb"  # NanoFlow §6.1: 8x A100 80GB SXM with NVLink
    c.hardware.tp = 8
    c.scheduler.name = "sarathi"
    c.scheduler.chunk_size = 2048  # the dense batch of NanoFlow's 70B pipeline
    c.scheduler.max_num_seqs = 4096  # bounded by the KV cache, not by a row cap
    # Offline: 2000 requests arriving within a few milliseconds, 512/512 tokens (a constant-length
    # workload of NanoFlow §6.2); the experiment also samples the traces' lengths.
    c.workload.kind = "poisson"
    c.workload.qps = 1.0e6
    c.workload.num_requests = 2000
    c.workload.duration_s = None
    c.workload.lengths.kind = "fixed"
    c.workload.lengths.prompt_len = 512
    c.workload.lengths.output_len = 512
    return c
