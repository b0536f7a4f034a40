"""Run an app on a real uvicorn server in a background thread (loopback, free port)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(config: uvicorn.Config):
    """Yield the base URL of a uvicorn server run from `config` until the block exits."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{config.host}:{config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def live_server(app, **uvicorn_kw):
    """Yield the base URL of `app` served by uvicorn (loopback, free port) until the block
    exits."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="error",
                            **uvicorn_kw)
    return serve_in_thread(config)
