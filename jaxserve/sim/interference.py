"""Kernel interference on a shared GPU: how fast an operation runs on a share of the execution units.

NanoFlow (arXiv:2408.12757, §4.1) runs compute-, memory- and network-bound nano-operations at the
same time, each on a share R of the device's SMs, and models each kind by a profiled curve
R -> P (P: the operation's throughput relative to running alone on the whole device):

* **GEMM** (compute-bound): P = R. NanoFlow measures shares by GEMM throughput, so this is its
  definition of R; it is linear because a GEMM's tiles spread evenly over the SMs it gets.
* **GEMV / decode attention** (memory-bound) and **collectives** (network-bound): concave. A few
  SMs already stream most of the HBM or NVLink bandwidth, so giving them a small R costs the GEMMs
  little and keeps most of their speed: that is what makes overlapping them pay.

The concave curves below are NanoFlow's own profile on 8xA100-80GB SXM (LLaMA-2-70B), as its
auto-search reads it. We use them for every GPU (marked ASSUMED in ``source`` elsewhere): the shape
(bandwidth saturating with few SMs) holds on Hopper too, but the numbers were measured on A100.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# efeslab/Nanoflow, autosearch/trace/gemv_interference.csv and net_interference.csv (commit
# d1bbe27771b9ae4662bda124f024834ff46f9fda): the R -> P pairs NanoFlow's auto-search reads for GEMV
# (decode attention) and network kernels overlapped with GEMMs on A100.
_NANOFLOW_SOURCE = ("NanoFlow (arXiv:2408.12757) auto-search profile on 8xA100-80GB: efeslab/Nanoflow "
                    "autosearch/trace/gemv_interference.csv and net_interference.csv @ d1bbe27")


@dataclasses.dataclass(frozen=True)
class InterferenceCurve:
    """P(R): an operation's throughput on a share ``R`` of the SMs, relative to the whole device;
    piecewise linear through (0, 0), the profiled points and (1, 1). ``shares`` strictly increasing
    in (0, 1), ``performance`` in (0, 1] and non-decreasing."""

    name: str
    shares: tuple[float, ...]
    performance: tuple[float, ...]
    source: str

    def __post_init__(self):
        r, p = np.asarray(self.shares, float), np.asarray(self.performance, float)
        if r.shape != p.shape or r.ndim != 1:
            raise ValueError(f"InterferenceCurve {self.name!r}: shares and performance must be equal-length sequences")
        if len(r) and (r[0] <= 0 or r[-1] >= 1 or np.any(np.diff(r) <= 0)):
            raise ValueError(f"InterferenceCurve {self.name!r}: shares must increase strictly within (0, 1)")
        if len(p) and (p[0] <= 0 or p[-1] > 1 or np.any(np.diff(p) < 0)):
            raise ValueError(f"InterferenceCurve {self.name!r}: performance must be non-decreasing within (0, 1]")
        object.__setattr__(self, "_r", np.concatenate([[0.0], r, [1.0]]))
        object.__setattr__(self, "_p", np.concatenate([[0.0], p, [1.0]]))

    def __call__(self, share):
        """P at ``share`` (a float or an array of them, each in [0, 1])."""
        return np.interp(share, self._r, self._p)


@dataclasses.dataclass(frozen=True)
class Interference:
    """The curves of the two kinds that share the device with the GEMMs (GEMMs: P = R)."""

    memory: InterferenceCurve
    network: InterferenceCurve


GEMV_A100 = InterferenceCurve(
    "gemv", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), (0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95),
    _NANOFLOW_SOURCE,
)
NETWORK_A100 = InterferenceCurve("network", (0.1, 0.2, 0.3, 0.4, 0.5), (0.4, 0.6, 0.7, 0.8, 0.9), _NANOFLOW_SOURCE)
NANOFLOW_A100 = Interference(GEMV_A100, NETWORK_A100)
