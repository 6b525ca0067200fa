"""The simulator: cost models (roofline over a BatchPlan), hardware and model specs, and a
discrete-event loop that drives any registered scheduler.

    >>> results = jaxserve.sim.simulate(config)   # config: configs/<name>.py get_config()
"""

from jaxserve.sim.cost_model import RooflineCostModel, StepCost
from jaxserve.sim.hardware import HARDWARE, HardwareSpec, get_hardware
from jaxserve.sim.models import MODELS, ModelSpec, get_model
from jaxserve.sim.overlap_cost_model import NanoSchedule, OverlapCostModel
from jaxserve.sim.simulate import ConfigError, Results, simulate
from jaxserve.sim.executor import CostModel, SimExecutor

__all__ = [
    "HARDWARE",
    "MODELS",
    "ConfigError",
    "CostModel",
    "HardwareSpec",
    "ModelSpec",
    "NanoSchedule",
    "OverlapCostModel",
    "Results",
    "RooflineCostModel",
    "SimExecutor",
    "StepCost",
    "get_hardware",
    "get_model",
    "simulate",
]
