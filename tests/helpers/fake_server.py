"""A scripted HTTP server on loopback (the client against answers a real server would not give) and the client
command run against it."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hetlora.cli import main
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.settings import TrainingSettings
from tests.helpers.server import LABELS


@contextlib.contextmanager
def loopback_server(respond):
    """A loopback HTTP server: every request's body is read and (method, path) recorded, then answered with
    `respond(method, path, requests so far)` -> (status, headers, body bytes); Content-Length is set. Yields
    (url, requests seen)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path))
            status, headers, body = respond(self.command, self.path, len(seen))
            self.send_response(status)
            for key, value in (headers | {"Content-Length": str(len(body))}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def fake_server(routes: dict):
    """A loopback server answering (method, path) -> (status, content type, body bytes[, extra headers]); records
    requests."""
    def respond(method, path, _):
        status, kind, body, *extra = routes.get((method, path.split("?")[0]), (404, "text/plain", b"nope"))
        return status, {"Content-Type": kind} | (extra[0] if extra else {}), body

    return loopback_server(respond)


def write_data(path, rows: int):
    path.write_text("text,label\n" + "".join(f"my {LABELS[i % 3]} question {i},{LABELS[i % 3]}\n" for i in range(rows)))
    return path


def as_json(doc) -> tuple:
    return 200, "application/json", json.dumps(doc).encode()


def run_client(capsys, url, tmp_path, model_dir=None):
    data = write_data(tmp_path / "data.csv", 12)
    argv = ["client", "--server", url, "--data", str(data), "--state-dir", str(tmp_path / "state"), "--no-progress",
            "--poll-seconds", "0.1"] + (["--model", str(model_dir)] if model_dir else [])
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return code, err[-1] if err else ""


def open_round_routes(run_config, adapter_bytes: bytes, plan: dict | None = None) -> dict:
    plan = plan or ClientPlan(round=1, rank=2, mode="plain", training=TrainingSettings(steps=1, batch_size=2,
                                                                                       seq_len=8)).to_json()
    return {("GET", "/v1/run"): as_json(run_config),
            ("POST", "/v1/register"): as_json({"client_id": "c-1", "token": "t", "rank": 2, "run": run_config}),
            ("GET", "/v1/round"): as_json({"round": 1, "state": "open", "selected": True, "uploaded": False, "rank": 2,
                                          "indices": None, "deadline": 0, "rounds": 2, "global_version": 0,
                                          "plan": plan}),
            ("POST", "/v1/profile"): as_json({"client_id": "c-1", "rank": 2}),
            ("GET", "/v1/rounds/1/adapter"): (200, "application/octet-stream", adapter_bytes)}
