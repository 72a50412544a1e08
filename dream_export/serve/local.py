"""Serve the app from this process with uvicorn: in the foreground (the CLI) or on a background thread
(an application that embeds the server, and the tests)."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI


def serve_forever(app: FastAPI, host: str, port: int) -> None:
    """Run until interrupted (Ctrl-C / SIGTERM)."""
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves `app` on a thread; port 0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.host, self.start_timeout = host, start_timeout
        self._thread = threading.Thread(target=self.server.run, name="dream-export-serve", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log above)")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
