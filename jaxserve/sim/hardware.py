"""Accelerator specs for the simulator's cost models: one table, every number with its source.

Units: FLOP/s, bytes, bytes/s, watts, US dollars per device-hour. Conventions:

* ``peak_flops`` is the **dense** (no 2:4 sparsity) tensor-core / MXU peak per dtype. NVIDIA
  datasheets print sparse figures for TF32/BF16/FP16/FP8/INT8 with a footnote; we halve them.
* ``memory_bytes`` is the device memory the software sees (``nvidia-smi`` "Total" for GPUs, the
  GiB figure Google documents for TPUs), because that is what vLLM's ``gpu_memory_utilization``
  multiplies. NVIDIA's "80GB" is in fact 80 GiB: ``nvidia-smi`` reports 81920 MiB for an A100 80GB.
* ``interconnect_bandwidth`` is the **per-direction** line rate of one device's scale-up link
  (NVLink, TPU ICI, PCIe where there is no NVLink), because a ring all-reduce is limited by what
  each device can send while it receives; vendors quote bidirectional totals, which we halve.
* ``host_bandwidth`` is the per-direction device<->host link (PCIe), used to cost KV swaps.
* ``power_idle_w`` is the draw of an idle device that holds a loaded model (P0, 0 % utilization),
  ``power_max_w`` the board TDP. Google publishes no TPU power figures, so those are ``None`` and
  cost models that need power report energy as not modelled.
* ``efficiency`` holds the default achievable fractions of peak (``mfu``, ``mbu``, link) with the
  measurements they come from; cost models take overrides.
* ``dvfs`` is the GPU's settable SM clock range (``nvidia-smi -q -d SUPPORTED_CLOCKS``) and lowest
  power limit, for the clock and power-cap model of ``jaxserve.sim.power``; None where no clocks are
  published (TPUs, the CPU entry). ``peak_flops`` is at the top clock.

Idle powers are ``nvidia-smi`` readings of idle GPUs (P0, 0 % utilization, persistence mode on)
printed in public deployment logs and issue reports; they vary by a few watts with temperature.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

from jaxserve.sim.power import Dvfs
from jaxserve.sim.tables import lookup

GiB = 1024**3
MiB = 1024**2

# Bytes per element of each dtype name the cost models accept.
DTYPE_BYTES: Mapping[str, int] = types.MappingProxyType({"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1})


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of a device's peaks, and the fixed cost of one collective.

    ``mfu``: fraction of peak FLOP/s a large GEMM-bound step reaches (model FLOPs utilization).
    ``mbu``: fraction of peak memory bandwidth a bandwidth-bound step reaches (model bandwidth util.).
    ``link``: fraction of the per-direction link rate a ring collective reaches (bus bandwidth).
    ``collective_latency_s``: fixed time of one small all-reduce / send, seconds.
    """

    mfu: float
    mbu: float
    link: float
    collective_latency_s: float
    source: str

    def __post_init__(self):
        for name in ("mfu", "mbu", "link"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"Efficiency.{name} must be in (0, 1], got {value!r}")
        if not self.collective_latency_s >= 0.0:
            raise ValueError(f"Efficiency.collective_latency_s must be >= 0, got {self.collective_latency_s!r}")


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """One device (GPU, TPU chip or CPU socket share). See the module docstring for conventions."""

    name: str
    peak_flops_by_dtype: Mapping[str, float]  # dense FLOP/s (OP/s for int8) per dtype
    memory_bytes: float  # device memory, bytes
    memory_bandwidth: float  # bytes/s
    interconnect_bandwidth: float | None  # bytes/s per direction; None: no scale-up link
    host_bandwidth: float | None  # bytes/s per direction to host memory; None: not published
    power_idle_w: float | None  # watts; None: not published
    power_max_w: float | None  # watts (TDP); None: not published
    price_per_hour_usd: float  # on-demand cloud price per device-hour
    efficiency: Efficiency
    sources: Mapping[str, str]  # field name -> citation
    nominal: bool = False  # True: numbers are nominal/measured stand-ins, not a vendor datasheet
    dvfs: Dvfs | None = None  # settable SM clocks and min power limit; None: not published

    def __post_init__(self):
        object.__setattr__(self, "peak_flops_by_dtype", types.MappingProxyType(dict(self.peak_flops_by_dtype)))
        object.__setattr__(self, "sources", types.MappingProxyType(dict(self.sources)))
        for dtype in self.peak_flops_by_dtype:
            if dtype not in DTYPE_BYTES:
                raise ValueError(f"HardwareSpec {self.name!r}: unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
        if (self.power_idle_w is None) != (self.power_max_w is None):
            raise ValueError(f"HardwareSpec {self.name!r}: give both idle and max power, or neither")
        if self.dvfs is not None and self.power_max_w is None:
            raise ValueError(f"HardwareSpec {self.name!r}: a clock model (dvfs) needs idle and max power")

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; ``ValueError`` if the device has no such datapath."""
        try:
            return self.peak_flops_by_dtype[dtype]
        except KeyError:
            raise ValueError(
                f"hardware {self.name!r} has no {dtype!r} peak; it supports {sorted(self.peak_flops_by_dtype)}"
            ) from None

    @property
    def has_power_model(self) -> bool:
        return self.power_max_w is not None


# --- shared citations -----------------------------------------------------------------------------
_A100_DATASHEET = (
    "NVIDIA A100 Tensor Core GPU datasheet (SXM): FP32 19.5 TF, BF16/FP16 312 TF, INT8 624 TOPS (dense), "
    "A100 40GB HBM2 1,555 GB/s, A100 80GB HBM2e 2,039 GB/s, max TDP 400 W, NVLink 600 GB/s, PCIe Gen4 64 GB/s; "
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
)
_H100_DATASHEET = (
    "NVIDIA H100 Tensor Core GPU datasheet (SXM): FP32 67 TF, BF16/FP16 1,979 TF*, FP8 3,958 TF*, INT8 3,958 TOPS* "
    "(*with sparsity; dense is half), 80 GB HBM3 3.35 TB/s, max TDP up to 700 W, NVLink 900 GB/s, PCIe Gen5 128 GB/s; "
    "https://www.nvidia.com/en-us/data-center/h100/"
)
_H200_DATASHEET = (
    "NVIDIA H200 Tensor Core GPU datasheet (SXM): same compute as H100 SXM (BF16 1,979 TF*, FP8 3,958 TF*, "
    "*sparse), 141 GB HBM3e 4.8 TB/s, max TDP up to 700 W, NVLink 900 GB/s, PCIe Gen5 128 GB/s; "
    "https://www.nvidia.com/en-us/data-center/h200/"
)
_L4_DATASHEET = (
    "NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3 TF, BF16/FP16 242 TF*, FP8 485 TF*, INT8 485 TOPS* (*sparse), "
    "24 GB GDDR6 300 GB/s, max power 72 W, PCIe Gen4 x16 64 GB/s (no NVLink); "
    "https://www.nvidia.com/en-us/data-center/l4/"
)
_TPU_V5E_DOC = (
    "Google Cloud TPU v5e system architecture: 197 TFLOP/s bf16, 393 TOP/s int8 per chip, 16 GiB HBM2 at "
    "819 GB/s, bidirectional ICI 400 GB/s per chip; https://cloud.google.com/tpu/docs/v5e"
)
_TPU_V5P_DOC = (
    "Google Cloud TPU v5p system architecture: 459 TFLOP/s bf16 per chip, 95 GiB HBM2e at 2,765 GB/s, "
    "bidirectional ICI 1,200 GB/s per chip; https://cloud.google.com/tpu/docs/v5p ; int8 918 TOP/s from the v5p "
    "launch post https://cloud.google.com/blog/products/ai-machine-learning/introducing-cloud-tpu-v5p-and-ai-hypercomputer"
)
_TPU_PRICING = (
    "Cloud TPU pricing, on-demand per chip-hour (US regions): v5e $1.20, v5p $4.20; https://cloud.google.com/tpu/pricing"
)
_TPU_POWER = (
    "Google publishes no per-chip power for TPU v5e/v5p (heise/c't on the v5p launch: Google 'conceals the power "
    "consumption of the individual chips'); energy is not modelled"
)
_NVIDIA_SMI_MEMORY = (
    "nvidia-smi 'Total' memory in public logs: A100-SXM4-40GB 40960 MiB, A100-SXM4-80GB 81920 MiB, "
    "H100 80GB HBM3 81559 MiB, H200 143771 MiB, L4 23034 MiB"
)
_NVIDIA_SMI_IDLE = (
    "nvidia-smi power draw of idle GPUs (P0, 0% util) in public logs: A100-SXM4-40GB 50-58 W, A100-SXM4-80GB "
    "63-70 W, H100 80GB HBM3 69-72 W, H200 76-78 W, L4 with a model loaded 35-36 W (11-17 W only in P8 sleep)"
)
_AWS_P4 = (
    "AWS EC2 on-demand, us-east-1 (2023-2025 list): p4d.24xlarge (8x A100 40GB) $32.7726/h, "
    "p4de.24xlarge (8x A100 80GB) $40.9657/h; https://aws.amazon.com/ec2/instance-types/p4/"
)
_AWS_P5 = (
    "AWS EC2 on-demand, us-east-1, after the June 2025 GPU price cut: p5.48xlarge (8x H100) $55.04/h "
    "(was $98.32/h at launch), p5en.48xlarge (8x H200) $63.296/h (p5e has no on-demand rate); "
    "https://aws.amazon.com/ec2/instance-types/p5/"
)
_AWS_G6 = (
    "AWS EC2 on-demand, us-east-1: g6.xlarge (1x L4, 4 vCPU) $0.8048/h; https://aws.amazon.com/ec2/instance-types/g6/"
)

# SM clocks: the top is nvidia-smi's "Max Clocks", the bottom the clock an idle board drops to (it
# reads that in P0 with nothing running), the step the spacing of the SUPPORTED_CLOCKS list; the
# lowest power limit is nvidia-smi's "Min Power Limit".
_A100_CLOCKS = Dvfs(
    min_mhz=210, max_mhz=1410, step_mhz=15, min_power_limit_w=100.0,
    source="nvidia-smi -q on A100-SXM4-40GB/80GB (public logs): Max Clocks SM 1410 MHz, idle at 210 MHz, Min Power "
    "Limit 100 W; SUPPORTED_CLOCKS lists 1410, 1395, 1380, ... MHz (15 MHz steps)",
)
_HOPPER_CLOCKS = Dvfs(
    min_mhz=345, max_mhz=1980, step_mhz=15, min_power_limit_w=200.0,
    source="nvidia-smi -q on H100 80GB HBM3 and H200 (public logs; awslabs/amazon-eks-ami PR #1985 for p5e): Max Clocks "
    "SM 1980 MHz, idle at 345 MHz; H100 Min Power Limit 200 W (H200: ASSUMED the same); 15 MHz steps ASSUMED as on "
    "A100 and L4",
)
_L4_CLOCKS = Dvfs(
    min_mhz=210, max_mhz=2040, step_mhz=15, min_power_limit_w=40.0,
    source="nvidia-smi -q -x on an L4 (public log): supported graphics clocks 2040, 2025, ... 210 MHz, min_power_limit "
    "40 W, max 72 W",
)

# mfu: NanoFlow (arXiv:2408.12757) serves LLaMA-2-70B on 8xA100 at 68.5 % of the compute-bound optimum;
# Megatron-LM (Narayanan et al., SC'21, arXiv:2104.04473) sustains 52 % of A100 peak. 0.6 sits between.
# mbu: decode-time weight-streaming kernels on H100 reach 78-84 % of HBM peak in Nsight measurements
# (mikamirai.com/blog/gpu-memory-bandwidth); 0.8 is that figure.
# link: NCCL maintainer, nccl-tests#212: NVLink4 line rate 450 GB/s, ~370 GB/s achievable (0.82);
# nccl-tests#149/#178: 8xA100 all-reduce bus bandwidth 200-208 GB/s of 300 GB/s (0.7).
# latency: sglang#2904 measured vLLM's custom all-reduce on H100 at 8.5-11.8 us for <= 32 KB (tp 2-8).
_GPU_EFF_SOURCE = (
    "mfu 0.6: NanoFlow arXiv:2408.12757 (68.5% of optimal, 8xA100) and Megatron-LM arXiv:2104.04473 (52% of "
    "A100 peak); mbu 0.8: H100 weight-load kernels at 78-84% of HBM peak (mikamirai.com/blog/gpu-memory-bandwidth); "
    "latency 10 us: vLLM custom all-reduce on H100, sglang PR #2904"
)
_A100_EFF = Efficiency(
    mfu=0.6, mbu=0.8, link=0.7, collective_latency_s=10e-6,
    source=_GPU_EFF_SOURCE + "; link 0.7: nccl-tests #149/#178, 200-208 GB/s all-reduce busbw of 300 GB/s",
)
_HOPPER_EFF = Efficiency(
    mfu=0.6, mbu=0.8, link=0.82, collective_latency_s=10e-6,
    source=_GPU_EFF_SOURCE + "; link 0.82: nccl-tests #212 (NCCL maintainer: ~370 of 450 GB/s)",
)
# No published serving measurements for these; the GPU figures are reused and marked as such.
_BORROWED_EFF = Efficiency(
    mfu=0.6, mbu=0.8, link=0.82, collective_latency_s=10e-6,
    source=_GPU_EFF_SOURCE + "; link 0.82: NCCL protocol overhead (~20%, nccl-tests #212). ASSUMED: borrowed "
    "from NVIDIA GPU measurements, no published figure for this device",
)


def _entries() -> dict[str, HardwareSpec]:
    a100_flops = {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12, "int8": 624e12}
    hopper_flops = {"fp32": 67e12, "bf16": 989.5e12, "fp16": 989.5e12, "fp8": 1979e12, "int8": 1979e12}
    specs = [
        HardwareSpec(
            name="a100-40gb",
            peak_flops_by_dtype=a100_flops,
            memory_bytes=40960 * MiB,
            memory_bandwidth=1555e9,
            interconnect_bandwidth=300e9,  # NVLink3 600 GB/s bidirectional
            host_bandwidth=32e9,  # PCIe Gen4 x16, 64 GB/s bidirectional
            power_idle_w=55.0,
            power_max_w=400.0,
            price_per_hour_usd=32.7726 / 8,
            efficiency=_A100_EFF,
            dvfs=_A100_CLOCKS,
            sources={
                "compute/bandwidth/power_max/links": _A100_DATASHEET,
                "memory_bytes": _NVIDIA_SMI_MEMORY,
                "power_idle_w": _NVIDIA_SMI_IDLE,
                "price_per_hour_usd": _AWS_P4,
            },
        ),
        HardwareSpec(
            name="a100-80gb",
            peak_flops_by_dtype=a100_flops,
            memory_bytes=81920 * MiB,
            memory_bandwidth=2039e9,
            interconnect_bandwidth=300e9,
            host_bandwidth=32e9,
            power_idle_w=65.0,
            power_max_w=400.0,
            price_per_hour_usd=40.9657 / 8,
            efficiency=_A100_EFF,
            dvfs=_A100_CLOCKS,
            sources={
                "compute/bandwidth/power_max/links": _A100_DATASHEET,
                "memory_bytes": _NVIDIA_SMI_MEMORY,
                "power_idle_w": _NVIDIA_SMI_IDLE,
                "price_per_hour_usd": _AWS_P4,
            },
        ),
        HardwareSpec(
            name="h100-sxm",
            peak_flops_by_dtype=hopper_flops,
            memory_bytes=81559 * MiB,
            memory_bandwidth=3.35e12,
            interconnect_bandwidth=450e9,  # NVLink4 900 GB/s bidirectional
            host_bandwidth=64e9,  # PCIe Gen5 x16, 128 GB/s bidirectional
            power_idle_w=70.0,
            power_max_w=700.0,
            price_per_hour_usd=55.04 / 8,
            efficiency=_HOPPER_EFF,
            dvfs=_HOPPER_CLOCKS,
            sources={
                "compute/bandwidth/power_max/links": _H100_DATASHEET,
                "memory_bytes": _NVIDIA_SMI_MEMORY,
                "power_idle_w": _NVIDIA_SMI_IDLE,
                "price_per_hour_usd": _AWS_P5,
            },
        ),
        HardwareSpec(
            name="h200",
            peak_flops_by_dtype=hopper_flops,
            memory_bytes=143771 * MiB,
            memory_bandwidth=4.8e12,
            interconnect_bandwidth=450e9,
            host_bandwidth=64e9,
            power_idle_w=77.0,
            power_max_w=700.0,
            price_per_hour_usd=63.296 / 8,
            efficiency=_HOPPER_EFF,
            dvfs=_HOPPER_CLOCKS,
            sources={
                "compute/bandwidth/power_max/links": _H200_DATASHEET,
                "memory_bytes": _NVIDIA_SMI_MEMORY,
                "power_idle_w": _NVIDIA_SMI_IDLE,
                "price_per_hour_usd": _AWS_P5,
            },
        ),
        HardwareSpec(
            name="l4",
            peak_flops_by_dtype={"fp32": 30.3e12, "bf16": 121e12, "fp16": 121e12, "fp8": 242.5e12, "int8": 242.5e12},
            memory_bytes=23034 * MiB,
            memory_bandwidth=300e9,
            interconnect_bandwidth=32e9,  # no NVLink: GPUs talk over PCIe Gen4 x16 (64 GB/s bidirectional)
            host_bandwidth=32e9,
            power_idle_w=35.0,
            power_max_w=72.0,
            price_per_hour_usd=0.8048,
            efficiency=_BORROWED_EFF,
            dvfs=_L4_CLOCKS,
            sources={
                "compute/bandwidth/power_max/links": _L4_DATASHEET,
                "memory_bytes": _NVIDIA_SMI_MEMORY,
                "power_idle_w": _NVIDIA_SMI_IDLE,
                "price_per_hour_usd": _AWS_G6,
            },
        ),
        HardwareSpec(
            name="tpu-v5e",
            peak_flops_by_dtype={"bf16": 197e12, "int8": 393e12},
            memory_bytes=16 * GiB,
            memory_bandwidth=819e9,
            interconnect_bandwidth=200e9,  # ICI 400 GB/s bidirectional per chip
            host_bandwidth=None,
            power_idle_w=None,
            power_max_w=None,
            price_per_hour_usd=1.20,
            efficiency=_BORROWED_EFF,
            sources={
                "compute/bandwidth/links": _TPU_V5E_DOC,
                "power": _TPU_POWER,
                "price_per_hour_usd": _TPU_PRICING,
            },
        ),
        HardwareSpec(
            name="tpu-v5p",
            peak_flops_by_dtype={"bf16": 459e12, "int8": 918e12},
            memory_bytes=95 * GiB,
            memory_bandwidth=2765e9,
            interconnect_bandwidth=600e9,  # ICI 1,200 GB/s bidirectional per chip
            host_bandwidth=None,
            power_idle_w=None,
            power_max_w=None,
            price_per_hour_usd=4.20,
            efficiency=_BORROWED_EFF,
            sources={
                "compute/bandwidth/links": _TPU_V5P_DOC,
                "power": _TPU_POWER,
                "price_per_hour_usd": _TPU_PRICING,
            },
        ),
        # NOMINAL. A generic 2-core x86 server share, pinned to what this project's CPU machines are:
        # 2 vCPU (2 physical cores, no SMT) AMD EPYC Zen 4 under KVM, 24 GiB. Peaks are measured there
        # (numpy/OpenBLAS, 2026): sgemm 2048^3 ~197 GFLOP/s fp32, i.e. 2 cores x 32 FP32 FLOP/cycle
        # (two 256-bit FMA pipes) x ~3.1 GHz; a streaming read of 1 GiB ~24 GB/s. They are therefore
        # already "achieved" figures, hence efficiencies of 1. No bf16 entry: XLA:CPU has no faster
        # bf16 GEMM path to credit. One socket share has no scale-up link and no separate host memory.
        HardwareSpec(
            name="cpu",
            peak_flops_by_dtype={"fp32": 197e9},
            memory_bytes=24 * GiB,
            memory_bandwidth=24e9,
            interconnect_bandwidth=None,
            host_bandwidth=None,
            power_idle_w=None,
            power_max_w=None,
            price_per_hour_usd=0.11592,
            efficiency=Efficiency(
                mfu=1.0, mbu=1.0, link=1.0, collective_latency_s=0.0,
                source="NOMINAL: peaks are measured sustained values, so no further derating",
            ),
            sources={
                "compute/bandwidth/memory": "NOMINAL: measured on the project's 2-vCPU AMD EPYC (Zen 4) KVM "
                "machine with numpy/OpenBLAS (sgemm 2048^3, 1 GiB streaming read); memory is the machine's 24 GiB",
                "power": "not modelled: a VM's share of a socket has no published or measurable power",
                "price_per_hour_usd": "AWS EC2 on-demand us-east-1: m7a.large (2 vCPU = 2 Zen 4 cores) $0.11592/h; "
                "https://aws.amazon.com/ec2/instance-types/m7a/",
            },
            nominal=True,
        ),
    ]
    return {spec.name: spec for spec in specs}


HARDWARE: Mapping[str, HardwareSpec] = types.MappingProxyType(_entries())


def get_hardware(name: str) -> HardwareSpec:
    """The spec called ``name`` (case-insensitive); ``ValueError`` listing the known names otherwise."""
    return lookup(HARDWARE, name, "hardware")


# jax ``device_kind`` substrings (lower case, most specific first) -> HARDWARE names.
DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    ("h200", "h200"),
    ("h100 80gb hbm3", "h100-sxm"),
    ("h100 sxm", "h100-sxm"),
    ("a100-sxm4-80gb", "a100-80gb"),
    ("a100 80gb", "a100-80gb"),
    ("a100-sxm4-40gb", "a100-40gb"),
    ("a100", "a100-40gb"),
    ("l4", "l4"),
    ("v5 lite", "tpu-v5e"),
    ("v5e", "tpu-v5e"),
    ("v5p", "tpu-v5p"),
)


def hardware_for_device(backend: str, kind: str) -> HardwareSpec | None:
    """The spec of the machine jax reports as ``backend`` (``jax.default_backend()``) and ``kind``
    (``device.device_kind``), or None when the table has no such device. Every CPU maps to the
    nominal ``"cpu"`` entry (the project's measured CI machine): CPUs report no usable kind."""
    if backend == "cpu":
        return HARDWARE["cpu"]
    kind = kind.lower()
    for needle, name in DEVICE_KINDS:
        if needle in kind:
            return HARDWARE[name]
    return None
