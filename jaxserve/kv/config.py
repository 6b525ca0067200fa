"""KVConfig: the shape of the paged KV cache a scheduler plans against."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KVConfig:
    """``num_blocks`` device blocks of ``block_size`` tokens each, plus ``num_host_blocks`` host
    (swap) blocks of the same size."""

    num_blocks: int
    block_size: int = 16
    num_host_blocks: int = 0

    def __post_init__(self):
        for name, minimum in (("num_blocks", 1), ("block_size", 1), ("num_host_blocks", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"KVConfig.{name} must be an int >= {minimum}, got {value!r}")

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole device cache holds."""
        return self.num_blocks * self.block_size
