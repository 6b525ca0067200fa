"""Sequence parallelism on a named device mesh (the ``"sp"`` axis), as pure jax functions.

* :mod:`~jaxserve.parallel.mesh`: the mesh with a sequence axis.
* :mod:`~jaxserve.parallel.online_softmax`: the float32 online-softmax state both attentions fold
  key blocks into and merge exactly by log-sum-exp.
* :mod:`~jaxserve.parallel.zigzag`: the load-balanced (zig-zag) sequence layout for causal ring
  attention and its per-step work plan.
* :mod:`~jaxserve.parallel.ring_attention`: causal prefill attention with K/V passed round the ring.
* :mod:`~jaxserve.parallel.decode_attention`: decode attention over K/V shards held by different
  devices, partials combined by log-sum-exp.
* :mod:`~jaxserve.parallel.esp_attention`: paged attention over KV pages spread across devices
  (the engine's elastic sequence parallelism), partials combined by log-sum-exp.
* :mod:`~jaxserve.parallel.reference`: single-device jnp references both must match.

Layer: an executor-side package, below the engine and above the model (``pyproject.toml``).
"""
