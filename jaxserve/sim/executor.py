"""SimExecutor: the simulator's Executor, a cost model standing in for the device."""

from __future__ import annotations

from typing import Optional, Protocol

import numpy as np

from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.runtime.executor import DecodeRun, Executor

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
