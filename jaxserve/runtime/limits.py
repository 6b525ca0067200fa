"""RunLimits: when a replica stops admitting work or stepping."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional


@dataclasses.dataclass(frozen=True)
class RunLimits:
    max_context: Optional[int] = None  # requests whose prompt + max_new_tokens exceed this are rejected
    max_sim_time_s: float = math.inf  # stop stepping once the clock passes this (seconds)
    max_steps: int = 50_000_000

    def __post_init__(self):
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"max_context must be >= 1 or None, got {self.max_context!r}")
        if not self.max_sim_time_s > 0:
            raise ValueError(f"max_sim_time_s must be > 0, got {self.max_sim_time_s!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps!r}")
