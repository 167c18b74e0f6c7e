"""Run the server in a background thread of this process (tests, benchmarks, in-process demos)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import uvicorn

from hetlora.engine.config import ServerConfig
from server_stub.app import create_app
from server_stub.cli import bind_socket


@contextlib.contextmanager
def serve_in_background(config: ServerConfig, state_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
                        enrollment=None, access=None, trusted_proxies: tuple[str, ...] = ()):
    """Yield the base URL of a running server (create_app + uvicorn on host:port, 0 = a free port); stop it on exit.

    `enrollment`: a server_stub.enrollment.Enrollment (default: open, loopback exempt from the rate limit);
    `access`, `trusted_proxies`: as create_app."""
    app = create_app(config, state_dir, enrollment, access, trusted_proxies)
    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, proxy_headers=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hetlora-server", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread stopped during start-up; see the log")
            time.sleep(0.02)
        url_host = f"[{host}]" if ":" in host else host
        yield f"http://{url_host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
