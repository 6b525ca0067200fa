"""Online serving: the real-time engine loop (``engine_loop``; ``routed`` for several engines behind
a router), the OpenAI-compatible HTTP server (``server``, ``python -m jaxserve.serve``), its
Prometheus metrics (``metrics``), an in-process test server (``testing.running_server``) and the
trace-replay load client (``python -m jaxserve.bench_serving``). A front door: it imports the
engine, the cluster's routers and the runtime; nothing in the package imports it."""
