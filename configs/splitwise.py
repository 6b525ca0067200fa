"""splitwise: Llama-2-70B split into prompt and token machines (Splitwise, Patel et al., ISCA'24).

One instance per 8-GPU machine (TP 8), as in Splitwise: this config is its Splitwise-HA design in
small, one DGX-H100 prompt machine (``cluster.pools.prefill``) handing each request's KV over
InfiniBand to two DGX-A100 token machines (``cluster.pools.decode``), plus one DGX-A100 mixed
machine that takes arrivals under join-the-shortest-queue routing and the handoffs no token machine
has room for (our stand-in for Splitwise's mixed pool, whose machines the cluster scheduler
repurposes between phases at run time). The KV leaves layer by layer under the prompt computation
(Splitwise §4.3). Arrivals: the shipped first 10 minutes of the Azure 2023 conversation trace
(Splitwise's own trace), cut to its first 1000 requests and rescaled to ``workload.qps``; requests
longer than Llama-2's 4096-token context are rejected (``experiments/splitwise_designs.py`` drops
them from the trace instead and compares every design at iso-cost and iso-power).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.output_dir = "outputs/splitwise"
    c.model.name = "llama-2-70b"
    c.hardware.name = "a100-80gb"  # token and mixed machines (DGX-A100)
    c.hardware.tp = 8  # one instance per 8-GPU machine (Splitwise §5)
    c.scheduler.name = "vllm"
    c.scheduler.max_num_seqs = 512  # SplitwiseSim's max_batch_size (configs/start_state/splitwise.yaml)
    c.workload.kind = "trace"
    c.workload.trace_path = "sample:azure_conv_2023_first_10min.csv"
    c.workload.duration_s = None
    c.workload.max_requests = 1000
    c.workload.qps = 3.0
    c.cluster.num_replicas = 4
    c.cluster.router = "shortest_queue"  # Splitwise's cluster scheduler routes by JSQ
    c.cluster.pools.prefill = 1
    c.cluster.pools.decode = 2  # replica 3 is the mixed machine
    c.cluster.pools.prefill_overrides = "hardware.name=h100-sxm"  # DGX-H100 prompt machine
    c.cluster.pools.decode_pick = "shortest_queue"
    # The A100 end's NIC bounds the copy: DGX A100 has one 200 Gb/s HDR ConnectX-6 per GPU (NVIDIA
    # DGX A100 datasheet); H100-to-H100 designs use infiniband-ndr (400 Gb/s ConnectX-7, DGX H100).
    c.cluster.pools.link = "infiniband-hdr"
    c.cluster.pools.overlap = "layer"
    return c
