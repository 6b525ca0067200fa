"""GPU power by phase, load and SM clock (DVFS): each GPU's supported clocks, and a step's energy.

Per device, a step of ``duration`` seconds draws idle power throughout and, over its busy part
``b = max(compute, memory)`` (one device's share of it, ``b / pp``), dynamic power

    D · [ (1 − κ)·memory/b  +  κ·s(f)·(σ + (1 − σ)·compute/b) ],     D = P_max − P_idle,

* the SM clock ``f`` sets compute throughput (compute time ∝ f_max / f); HBM runs on its own
  memory clock, which SM DVFS leaves alone, so memory time does not change with ``f``;
* ``κ`` (CORE_SHARE) is the share of dynamic power in the SM-clocked domain (SMs, tensor cores,
  L2), ``1 − κ`` the memory system's, drawn while memory streams;
* ``σ`` (STALL_ACTIVITY) is the SM domain's activity while it waits on memory (clocked, stalled
  warps), relative to computing flat out;
* ``s(f) = (f / f_max)·(V(f) / V(f_max))²`` is dynamic power's V²f scaling, the voltage flat at its
  floor below the knee clock and proportional to ``f`` above it (``Dvfs.core_scale``).

So compute-bound prefill draws close to TDP, memory-bound decode about a third of ``D``, and a lower
clock cuts decode power at no cost in time until compute becomes the bound, while it slows prefill
in proportion. In energy terms the dynamic part is ``(1 − κ)·D·memory + κ·D·s(f)·(σ·b + (1 − σ)·compute)``:
``StepPower.energy`` evaluates exactly that, for a float or a numpy array alike.

A power cap (``nvidia-smi -pl``) makes the GPU lower its clock until the busy power fits: per step,
the highest supported clock at or below the set one whose busy power is at most the cap
(``StepPower.clocked``); at the lowest clock the cap is not enforced further (the clock cannot drop).
"""

from __future__ import annotations

import dataclasses

# -- voltage/frequency -----------------------------------------------------------------------------
# The knee of the V/f curve as a fraction of the top clock. nvidia-smi on idle and loaded
# A100-SXM4 boards reads 706 mV at 210 MHz (its lowest clock) and 744 mV at 1155 MHz: within 5 % of
# the floor up to 1155 MHz of 1410 (public `nvidia-smi -q` logs: A100-SXM4-40GB idle, 706.25 mV @
# 210 MHz; A100-SXM4-80GB under load, 743.75 mV @ 1155 MHz). Above the knee V ∝ f gives 744·1410/1155
# = 908 mV at 1410 MHz, the range of the L4's 885 mV at its 2040 MHz top clock (nvidia-smi XML log).
# Hopper and Ada publish no V/f readings; they borrow the A100's fraction.
KNEE_FRACTION = 1155.0 / 1410.0
KNEE_SOURCE = (
    "V/f knee at 1155/1410 of the top clock: nvidia-smi reads A100-SXM4 at 706 mV @ 210 MHz and 744 mV @ 1155 MHz "
    "(public -q logs); V ∝ f above it (908 mV @ 1410 MHz, cf. L4 885 mV @ 2040 MHz)"
)

# -- phase split of dynamic power -------------------------------------------------------------------
# Calibrated on one published measurement of memory-bound decode on an H200 (Ma, Afzal, Eitzinger,
# Wellein, "The Illusion of Power Capping in LLM Decode", arXiv:2605.11999): decode draws 137-300 W
# of the 700 W TDP, and locking the SM clock saves up to 32 % of decode energy at minimal throughput
# loss. With H200 idle 77 W (hardware.py) and D = 623 W, a decode step busy for its whole duration
# draws idle + D·((1 − κ) + κσ) = 300 W, so (1 − κ) + κσ = 223/623; the 32 % is taken at half the top
# clock (ASSUMED: where memory-bound decode keeps its speed), s = 0.5·KNEE_FRACTION², so
# κσ·(1 − s)·D = 0.32·300 W. That gives κ ≈ 0.87 and σ ≈ 0.27, and compute-bound prefill near
# TDP (H100: 70 + 630·0.88 ≈ 620 W), as Splitwise (Patel et al., ISCA'24, §III) measures prompt
# phases close to TDP and token phases far below it.
_DECODE_W, _DECODE_SAVING, _H200_IDLE_W, _H200_TDP_W = 300.0, 0.32, 77.0, 700.0
_HALF_CLOCK_SCALE = 0.5 * KNEE_FRACTION**2
_STALL_POWER = _DECODE_SAVING * _DECODE_W / ((1.0 - _HALF_CLOCK_SCALE) * (_H200_TDP_W - _H200_IDLE_W))  # κσ
_MEMORY_SHARE = (_DECODE_W - _H200_IDLE_W) / (_H200_TDP_W - _H200_IDLE_W) - _STALL_POWER  # 1 − κ
CORE_SHARE = 1.0 - _MEMORY_SHARE
STALL_ACTIVITY = _STALL_POWER / CORE_SHARE
PHASE_SOURCE = (
    "core share κ and stall activity σ from H200 decode: 137-300 W of 700 W, SM clock locking saves up to 32 % of "
    "decode energy (Ma et al., arXiv:2605.11999); prompt phases near TDP (Splitwise, ISCA'24)"
)


@dataclasses.dataclass(frozen=True)
class Dvfs:
    """A GPU's settable SM clocks (``min_mhz`` to ``max_mhz`` in ``step_mhz`` steps, as
    ``nvidia-smi -q -d SUPPORTED_CLOCKS`` lists them) and the lowest power limit it accepts
    (``nvidia-smi -q`` "Min Power Limit", watts)."""

    min_mhz: int
    max_mhz: int
    step_mhz: int
    min_power_limit_w: float
    source: str

    def __post_init__(self):
        if not 0 < self.min_mhz < self.max_mhz or self.step_mhz <= 0 or (self.max_mhz - self.min_mhz) % self.step_mhz:
            raise ValueError(f"Dvfs: {self.min_mhz}-{self.max_mhz} MHz is not a whole number of {self.step_mhz} MHz steps")

    @property
    def knee_mhz(self) -> float:
        """The clock below which the core voltage sits at its floor (``KNEE_FRACTION``)."""
        return self.max_mhz * KNEE_FRACTION

    def clocks(self) -> tuple[int, ...]:
        """Every supported SM clock, ascending."""
        return tuple(range(self.min_mhz, self.max_mhz + 1, self.step_mhz))

    def describe(self) -> str:
        return f"{self.min_mhz}-{self.max_mhz} MHz in steps of {self.step_mhz} MHz"

    def supports(self, mhz) -> bool:
        return (isinstance(mhz, int) and not isinstance(mhz, bool) and self.min_mhz <= mhz <= self.max_mhz
                and (mhz - self.min_mhz) % self.step_mhz == 0)  # fmt: skip

    def core_scale(self, mhz: float) -> float:
        """Dynamic power of the SM domain at ``mhz`` relative to the top clock: f·V(f)², V flat below
        the knee and ∝ f above it (1.0 at ``max_mhz``)."""
        knee, top = self.knee_mhz, float(self.max_mhz)
        return (mhz / top) * (max(mhz, knee) / top) ** 2


class ClockError(ValueError):
    """A clock or power cap the hardware does not support; ``argument`` names which
    (``"frequency_mhz"`` or ``"power_cap_w"``), so a config reader can name its key."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


def check_clock(name: str, dvfs: Dvfs | None, tdp_w: float, frequency_mhz=None, power_cap_w=None) -> None:
    """``ClockError`` unless ``frequency_mhz`` (None: the top clock) is one of ``dvfs``'s clocks and
    ``power_cap_w`` (None: no cap) lies in [its min power limit, ``tdp_w``]; hardware ``name`` without
    ``dvfs`` takes neither."""
    for argument, value in (("frequency_mhz", frequency_mhz), ("power_cap_w", power_cap_w)):
        if value is not None and dvfs is None:
            raise ClockError(argument, f"hardware {name!r} has no published clock/power model (DVFS); "
                                       f"{argument} cannot be set")
    if frequency_mhz is not None and not dvfs.supports(frequency_mhz):
        raise ClockError("frequency_mhz", f"{frequency_mhz!r} MHz is not a supported SM clock of {name!r}: "
                                          f"{dvfs.describe()}")
    if power_cap_w is not None and not (
        isinstance(power_cap_w, (int, float)) and not isinstance(power_cap_w, bool)
        and dvfs.min_power_limit_w <= power_cap_w <= tdp_w
    ):
        raise ClockError("power_cap_w", f"{power_cap_w!r} W is outside the power limits {name!r} accepts: "
                                        f"{dvfs.min_power_limit_w:g}-{tdp_w:g} W (min power limit to TDP)")


class StepPower:
    """Energy of a step on ``devices`` devices (``pp`` pipeline stages) of one GPU at a set clock,
    optionally under a per-device power cap; see the module docstring. ``idle_w``/``dynamic_w`` per
    device (0 and 0 where power is not modelled); ``dvfs`` None: no clock model (``frequency_mhz`` and
    ``power_cap_w`` must then be None). ``ClockError`` (``check_clock``) for a clock the GPU does not
    support or a cap outside [its min power limit, TDP]."""

    def __init__(self, name: str, idle_w: float, dynamic_w: float, devices: int, pp: int, dvfs: Dvfs | None,
                 frequency_mhz: int | None = None, power_cap_w: float | None = None):
        check_clock(name, dvfs, idle_w + dynamic_w, frequency_mhz, power_cap_w)
        self.idle_w, self.dynamic_w, self.devices = float(idle_w), float(dynamic_w), devices
        top = dvfs.max_mhz if dvfs is not None else None
        self.frequency_mhz = frequency_mhz if frequency_mhz is not None else top
        self.power_cap_w = None if power_cap_w is None else float(power_cap_w)
        # compute throughput relative to the top clock; exactly 1.0 at it (so durations are unchanged)
        self.clock_ratio = 1.0 if dvfs is None else self.frequency_mhz / top
        self.scale = 1.0 if dvfs is None else dvfs.core_scale(self.frequency_mhz)
        self._e_memory = self.dynamic_w * (1.0 - CORE_SHARE) / pp
        self._e_stall = self.dynamic_w * CORE_SHARE * STALL_ACTIVITY / pp
        self._e_compute = self.dynamic_w * CORE_SHARE * (1.0 - STALL_ACTIVITY) / pp
        self._capped = power_cap_w is not None
        if self._capped:  # candidate clocks at or below the set one, highest first
            clocks = [c for c in dvfs.clocks() if c <= self.frequency_mhz][::-1]
            self._slowdown = [self.frequency_mhz / c for c in clocks]  # compute time factor vs the set clock
            self._scales = [dvfs.core_scale(c) for c in clocks]

    @property
    def capped(self) -> bool:
        """Whether a power cap may lower the clock step by step (then no step is vectorized)."""
        return self._capped

    def busy_power_w(self, compute, memory, scale):
        """Watts one device draws while busy on ``compute``/``memory`` seconds of work at ``scale``."""
        busy = max(compute, memory)
        return self.idle_w + self.dynamic_w * ((1.0 - CORE_SHARE) * memory / busy
                                               + CORE_SHARE * scale * (STALL_ACTIVITY + (1.0 - STALL_ACTIVITY) * compute / busy))  # fmt: skip

    def clocked(self, compute, memory):
        """``(compute, scale)`` at the clock the step runs at: the set clock, or under a cap the highest
        one whose busy power fits (binary search: busy power falls monotonically with the clock)."""
        if not self._capped or not (compute > 0.0 or memory > 0.0):
            return compute, self.scale
        cap, slow, scales = self.power_cap_w, self._slowdown, self._scales
        if self.busy_power_w(compute, memory, scales[0]) <= cap:
            return compute, scales[0]
        lo, hi = 0, len(slow) - 1  # lo violates the cap; find the first index that fits
        if self.busy_power_w(compute * slow[hi], memory, scales[hi]) > cap:
            return compute * slow[hi], scales[hi]  # the lowest clock: the cap cannot be met
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.busy_power_w(compute * slow[mid], memory, scales[mid]) <= cap:
                hi = mid
            else:
                lo = mid
        return compute * slow[hi], scales[hi]

    def energy(self, duration, busy, compute, memory, scale):
        """Joules of the step on every device: idle power for ``duration``, dynamic power for each
        device's share of ``busy`` (module docstring). Floats or float64 arrays, the same operations."""
        dynamic = self._e_memory * memory + scale * (self._e_stall * busy + self._e_compute * compute)
        return (self.idle_w * duration + dynamic) * self.devices

