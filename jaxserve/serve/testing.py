"""An in-process server for tests and benchmarks: ``running_server`` starts the app on a free port
of 127.0.0.1 in a background thread and yields its base URL.

    with running_server(llm) as url:          # url == "http://127.0.0.1:<port>"
        httpx.post(url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 8})

``llm`` is a ``jaxserve.LLM`` (or a model directory, with ``llm_options`` for ``jaxserve.LLM``);
``app_options`` go to ``server.build_app`` (``model_name``, ``max_queue``, ``grace_s``). The
app is ``server.app`` of the yielded URL's ``Server`` if a test needs the loop or the metrics:
``with running_server(llm) as url: url.app.state.serving.loop``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from jaxserve.serve.server import build_app


class ServerURL(str):
    """The base URL, also carrying the running ``app`` and the uvicorn ``server``."""

    app: object
    server: uvicorn.Server


@contextlib.contextmanager
def running_server(llm, *, llm_options: dict | None = None, startup_timeout_s: float = 60.0, **app_options) -> Iterator[ServerURL]:
    if isinstance(llm, str):
        import jaxserve

        llm = jaxserve.LLM(llm, **(llm_options or {}))
    app = build_app(llm, **app_options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=app_options.get("grace_s", 30.0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="jaxserve-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.app, url.server = app, server
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
