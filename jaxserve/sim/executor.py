"""SimExecutor: the simulator's Executor, a cost model standing in for the device."""

from __future__ import annotations

from typing import Optional, Protocol

import numpy as np

from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.runtime.executor import DecodeRun, Executor
from jaxserve.sim.cost_model import RooflineCostModel

SIM_TOKEN_ID = 1  # the simulator samples no real tokens; requests finish on max_new_tokens


class CostModel(Protocol):
    """A BatchPlan's modelled duration and energy (``RooflineCostModel``, ``ProfiledCostModel``)."""

    def step(self, plan: BatchPlan):
        """An object with ``duration_s`` and ``energy_j`` (``cost_model.StepCost``)."""
        ...

    def decode_run(self, num_rows: int, context_tokens: int, max_context: int, k: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """float64 [k] durations and energies of k identical-batch decode steps, each equal to
        ``step`` of that step bit for bit; ``None`` if this model has no closed form."""
        return None


class SimExecutor(Executor):
    """Executes a BatchPlan on a cost model: the step's modelled duration and energy, and a
    placeholder token for every row that samples."""

    def __init__(self, cost_model: CostModel):
        self.cost_model = cost_model

    def execute(self, plan: BatchPlan) -> StepOutput:
        cost = self.cost_model.step(plan)
        return StepOutput.repeated(plan, SIM_TOKEN_ID, cost.duration_s, cost.energy_j)

    def step_cost(self, plan: BatchPlan) -> tuple[float, float, int]:
        cost = self.cost_model.step(plan)
        return cost.duration_s, cost.energy_j, SIM_TOKEN_ID

    def decode_run(self, num_rows: int, context_tokens: int, max_context: int, k: int) -> Optional[DecodeRun]:
        run = self.cost_model.decode_run(num_rows, context_tokens, max_context, k)
        return None if run is None else DecodeRun(run[0], run[1], SIM_TOKEN_ID)

    def prefill_run(self, num_rows: int, decode_context: int, prefill_context: int, chunks, completes: bool) -> Optional[DecodeRun]:
        cm = self.cost_model
        cls = type(cm)
        # Only where ``step`` is the roofline's own ``combine(parts(plan))``: then the plans' totals,
        # summed here as Python ints (exact, as numpy's int64 sums of them are), give the same floats.
        if not isinstance(cm, RooflineCostModel) or cls.step is not RooflineCostModel.step or cls.parts is not RooflineCostModel.parts:
            return None
        m, d, c, last = num_rows - 1, decode_context, prefill_context, len(chunks) - 1
        durations, energies = [], []
        for j, n in enumerate(chunks):
            tokens = float(m + n)
            # parts(plan): Σ n·c + (Σ n² + Σ n)/2 over the rows, n = 1 for the decodes
            pairs = float(d + n * c) + 0.5 * (float(m + n * n) + tokens)
            samples = m + (completes and j == last)
            duration, energy, *_ = cm.combine(cm.parts_from_totals(tokens, float(d + c), pairs, samples, num_rows), max)
            durations.append(duration)
            energies.append(energy)
            d, c = d + m, c + n
        return DecodeRun(np.array(durations, np.float64), np.array(energies, np.float64), SIM_TOKEN_ID)
