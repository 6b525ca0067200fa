"""Moving KV blocks between two replicas: the links, a copy of block contents, and its timing.

Live migration (``migration.py``) and the prefill-to-decode handoff of phase pools (``handoff.py``)
both copy a request's blocks from one replica's pool to another's. ``copy_blocks`` does it: real
executors move the contents (``read_kv`` / ``write_kv``) and the copy takes its measured wall time;
simulated ones hold no contents and the copy takes ``KVLink.transfer_s`` of the bytes.

Bytes per device: a replica of tp·pp devices holds 1/(tp·pp) of each block on each device
(``ReplicaSpec.kv_bytes_per_block``), and every device sends or receives its own share over its own
link at once, so a copy's time is set by the larger per-device share of the two ends (prefill and
decode pools may use different TP degrees).

``transfer_end`` is the timing of one handoff on a link that carries one transfer at a time (FIFO):
whole (it starts once the prefill step has ended), or layer by layer overlapped with the prefill
step (Splitwise §4.3, DistServe §4.2): each layer's KV leaves as soon as that layer has run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

from jaxserve.sim.tables import lookup

# Link bandwidths, one direction, bytes/s, and the per-message latency a copy pays.
# NVLink 3 (A100): 600 GB/s bidirectional (NVIDIA A100 datasheet); NVLink 4 (H100 SXM): 900 GB/s
# bidirectional (NVIDIA H100 datasheet); PCIe 4.0 x16: 32 GB/s (PCI-SIG; ~25 GB/s achieved);
# InfiniBand HDR: 200 Gb/s (NVIDIA ConnectX-6); InfiniBand NDR: 400 Gb/s (NVIDIA ConnectX-7, the
# per-GPU NIC of a DGX H100, which Splitwise assumes between its machines); 100 / 25 GbE.
LINKS = {
    "nvlink3": (300e9, 10e-6),
    "nvlink4": (450e9, 10e-6),
    "pcie4": (25e9, 10e-6),
    "infiniband-hdr": (25e9, 5e-6),
    "infiniband-ndr": (50e9, 5e-6),
    "ethernet-100g": (12.5e9, 50e-6),
    "ethernet-25g": (3.125e9, 50e-6),
}
OVERLAPS = ("none", "layer")


@dataclasses.dataclass(frozen=True)
class KVLink:
    """The link KV crosses between two replicas: ``bandwidth`` bytes/s one way, ``latency_s`` per copy."""

    bandwidth: float = LINKS["infiniband-hdr"][0]
    latency_s: float = LINKS["infiniband-hdr"][1]
    name: str = "infiniband-hdr"

    def __post_init__(self):
        if not self.bandwidth > 0:
            raise ValueError(f"KVLink bandwidth must be > 0 bytes/s, got {self.bandwidth!r}")
        if not self.latency_s >= 0:
            raise ValueError(f"KVLink latency_s must be >= 0, got {self.latency_s!r}")

    @classmethod
    def named(cls, name: str) -> "KVLink":
        bandwidth, latency = lookup(LINKS, name, "link")
        return cls(bandwidth, latency, name.strip().lower())

    def transfer_s(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth


class Copy(NamedTuple):
    """One copy of blocks: its duration (s; measured when ``measured``), and bytes per device."""

    duration_s: float
    num_bytes: float
    measured: bool


def device_bytes(source_spec, destination_spec, num_blocks: int) -> float:
    """Bytes the busiest device of either end moves for ``num_blocks`` blocks (module docstring)."""
    return num_blocks * max(source_spec.kv_bytes_per_block, destination_spec.kv_bytes_per_block)


def copy_blocks(source_spec, destination_spec, src_blocks, dst_blocks, link: KVLink) -> Copy:
    """Copies the KV of ``src_blocks`` (source pool) into ``dst_blocks`` (destination pool, same
    count). Real executors copy the contents and the copy is timed; simulated ones model it."""
    for executor in (source_spec.executor, destination_spec.executor):
        prepare = getattr(executor, "prepare_kv_copy", None)
        if prepare is not None:
            prepare(len(src_blocks))  # compilation is not copy time
    t0 = time.perf_counter()
    payload = source_spec.executor.read_kv(src_blocks)
    if payload is not None:
        destination_spec.executor.write_kv(dst_blocks, payload)
        return Copy(time.perf_counter() - t0, float(payload.nbytes), True)
    num_bytes = device_bytes(source_spec, destination_spec, len(src_blocks))
    return Copy(link.transfer_s(num_bytes), num_bytes, False)


def transfer_end(
    link: KVLink,
    num_bytes: float,
    *,
    ready_s: float,
    link_free_s: float = 0.0,
    step_start_s: float | None = None,
    num_layers: int = 1,
    step_bytes: float = 0.0,
) -> float:
    """When a handoff of ``num_bytes`` (per device) over ``link`` ends.

    Whole (``step_start_s`` None): it starts at ``max(ready_s, link_free_s)`` and takes
    ``link.transfer_s(num_bytes)``. Layer by layer: the prefill step ran from ``step_start_s`` to
    ``ready_s`` and produced ``step_bytes`` of the bytes, layer l's share at
    ``step_start_s + (l + 1)·D / num_layers``; the rest (earlier chunks') was ready at the step's
    start. The link sends what is ready, one byte stream at ``bandwidth`` from ``link_free_s`` on, so
    the end is the latest of: everything sent from the start, the first layer's share and all after
    it, the last layer's share alone — plus one latency."""
    if step_start_s is None:
        return max(ready_s, link_free_s) + link.transfer_s(num_bytes)
    if not num_layers >= 1 or not 0 <= step_bytes <= num_bytes or not step_start_s <= ready_s:
        raise ValueError(f"transfer_end: need num_layers >= 1, 0 <= step_bytes <= num_bytes and the step to start "
                         f"by its end; got {num_layers}, {step_bytes}, {num_bytes}, {step_start_s}..{ready_s}")
    bw, d = link.bandwidth, ready_s - step_start_s
    # The send finishing time is max over release points of (release + bytes from there on) / bw;
    # the layers' releases are linear in l, so the max is at the first or the last layer.
    end = max(
        max(link_free_s, step_start_s) + num_bytes / bw,
        step_start_s + d / num_layers + step_bytes / bw,
        ready_s + step_bytes / (num_layers * bw),
    )
    return end + link.latency_s
