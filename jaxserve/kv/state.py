"""KVState: the device block pool and the host (swap) pool a scheduler owns."""

from __future__ import annotations

import dataclasses

from jaxserve.kv.block_pool import BlockPool
from jaxserve.kv.config import KVConfig


@dataclasses.dataclass(frozen=True)
class KVState:
    config: KVConfig
    device: BlockPool
    host: BlockPool

    @classmethod
    def create(cls, config: KVConfig, enable_prefix_caching: bool = False) -> "KVState":
        return cls(
            config,
            BlockPool(config.num_blocks, enable_caching=enable_prefix_caching),
            BlockPool(config.num_host_blocks),
        )

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def usage(self) -> float:
        """Fraction of device blocks referenced by a block table."""
        return self.device.num_used / self.config.num_blocks
