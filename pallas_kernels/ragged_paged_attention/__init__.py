"""ragged_paged_attention: Pallas kernel (kernel.py) and its jnp reference (reference.py)."""
