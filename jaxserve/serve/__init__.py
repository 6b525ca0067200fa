"""Online serving: the real-time engine loop (``engine_loop``), the OpenAI-compatible HTTP server
(``server``, ``python -m jaxserve.serve``), its Prometheus metrics (``metrics``) and an in-process
test server (``testing.running_server``). A front door: it imports the engine and the runtime;
nothing in the package imports it."""
