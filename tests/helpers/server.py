"""Talking to a real aggregation server: a config, a server on loopback, registrations, uploads, and the dense
references of the rules (the papers' formulas, docs/PROTOCOL.md), written here independently of the rule code."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from hetlora.protocol.wire import Adapter, decode

LABELS = ("balance", "card", "transfer")
TARGETS = ("query", "value")


def make_config(spec, **overrides):
    from hetlora.engine.config import ServerConfig

    defaults = dict(spec=spec, aggregator="hetlora", labels=LABELS, ranks=(2, 4, 8), global_rank=8, min_clients=3,
                    round_deadline=600.0, rounds=2, seed=7)
    return ServerConfig(**{**defaults, **overrides})


@contextlib.contextmanager
def running_server(config, state_dir):
    """A real server in a background thread on a free loopback port; yields an httpx client on its URL."""
    from server_stub.background import serve_in_background

    with serve_in_background(config, state_dir) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def register(http, requested_rank, n_samples=10, name=None):
    reply = http.post("/v1/register", json={"profile": {"device": "test"}, "requested_rank": requested_rank,
                                            "n_samples": n_samples, "name": name})
    assert reply.status_code == 201, reply.text
    body = reply.json()
    return body | {"auth": {"Authorization": f"Bearer {body['token']}"}}


def make_update(spec, rank, meta, seed, *, module_names=None, dtype=np.float32):
    """Random factors at `rank` for every spec module (or `module_names`), random dense tensors."""
    rng = np.random.default_rng(seed)
    lora = {}
    for name in module_names or spec.modules:
        m = spec.modules.get(name) or next(iter(spec.modules.values()))
        lora[name] = (rng.normal(0, 0.1, (rank, m.in_features)).astype(dtype),
                      rng.normal(0, 0.1, (m.out_features, rank)).astype(dtype))
    dense = {n: rng.normal(0, 0.1, shape).astype(dtype) for n, shape in spec.dense.items()}
    return Adapter(lora=lora, dense=dense, meta=meta)


def upload_meta(client, round_number, rank, n_samples, effective_rank=None, indices=None):
    meta = {"round": round_number, "client_id": client["client_id"], "rank": rank,
            "effective_rank": effective_rank or rank, "n_samples": n_samples}
    if indices is not None:
        meta["indices"] = indices
    return meta


def post_update(http, client, round_number, body: bytes):
    return http.post(f"/v1/rounds/{round_number}/update", content=body,
                     headers={**client["auth"], "Content-Type": "application/octet-stream"})


def error_code(reply) -> str:
    return reply.json()["error"]["code"]


def global_adapter(http) -> Adapter:
    reply = http.get("/v1/global")
    assert reply.status_code == 200
    return decode(reply.content)


def wait_for(http, predicate, attempts=200):
    """The server's status once `predicate(status)` holds (polled every 50 ms, up to `attempts` times)."""
    for _ in range(attempts):
        status = http.get("/v1/status").json()
        if predicate(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"condition not reached; last status: {status}")


def snapshot(http, state_dir: Path) -> tuple:
    """Everything a rejected request must leave unchanged: status, DB rows, blob files."""
    with sqlite3.connect(state_dir / "state.sqlite") as db:
        rows = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                for t in ("clients", "rounds", "uploads", "globals")}
    blobs = sorted((str(p.relative_to(state_dir)), p.stat().st_size) for p in (state_dir / "blobs").rglob("*"))
    return http.get("/v1/status").json(), rows, blobs


# --- `hetlora serve` in a child process ------------------------------------------------------------
def start_cli_server(tiny_bert_dir, labels_file, state_dir, *, rounds=2, extra=(), verify=True, stderr=None):
    """`hetlora serve` (hetlora, ranks 2,4,8, min-clients 3, `extra` options) of the tiny BERT in a forked child
    (fork_serve); returns (process, base URL) once it answers."""
    argv = ["--model", str(tiny_bert_dir), "--labels", str(labels_file), "--targets", ",".join(TARGETS),
            "--aggregator", "hetlora", "--ranks", "2,4,8", "--min-clients", "3", "--rounds", str(rounds), "--seed",
            "7", "--head-init", "none", *extra]
    return fork_serve(argv, state_dir, verify=verify, stderr=stderr)


def fork_serve(argv, state_dir, *, verify=True, stderr=None):
    """`hetlora serve --state-dir STATE_DIR --port 0 ARGV` (hetlora.cli.main) in a forked child process; returns
    (process, base URL) once it answers (`verify`: httpx's certificate check for https; `stderr`: a file that gets
    the child's stderr and log, as a terminal would).

    Forked rather than a fresh interpreter so the child skips re-importing torch and transformers;
    it still parses the command line, derives the spec, binds a port and writes server.json itself.
    """
    argv = ["serve", "--state-dir", str(state_dir), "--port", "0", *argv]
    proc = multiprocessing.get_context("fork").Process(target=_serve, args=(argv, stderr), daemon=True)
    proc.start()
    info_file = Path(state_dir) / "server.json"
    for _ in range(1200):
        if not proc.is_alive():
            raise AssertionError(f"server exited with code {proc.exitcode}")
        if info_file.exists() and json.loads(info_file.read_text())["pid"] == proc.pid:
            url = json.loads(info_file.read_text())["url"]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/status", timeout=5, verify=verify).status_code == 200:
                    return proc, url
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    raise AssertionError("server did not start")


def _serve(argv, stderr=None):
    from hetlora.cli import main

    if stderr is not None:  # the command's own logging, not the handlers the forked pytest process had
        fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 2)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's stderr until exit)
        for handler in logging.root.handlers[:]:
            logging.root.removeHandler(handler)
    os._exit(main(argv))


def sigkill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL


# --- dense references (the papers' formulas) -------------------------------------------------------
def pad(a, b, rank):
    a_pad = np.zeros((rank, a.shape[1]))
    b_pad = np.zeros((b.shape[0], rank))
    a_pad[: a.shape[0]], b_pad[:, : b.shape[1]] = a, b
    return a_pad, b_pad


def reference_global(rule, previous: Adapter, uploads: list[tuple[Adapter, int, list | None]]) -> dict:
    """name -> (A, B) of the expected new global (name -> dense B @ A for hlora, whose factors are not unique),
    plus dense tensors under their names. Sample-weighted averages are np.average; hetlora weighs by ||B A||_F;
    hlora's product is truncated to the global rank R (exact when the client ranks sum to at most R); plora
    moves index j by sum_k (n_k / n) (x_kj - x_j) over the clients that trained it."""
    n = np.array([n_k for _, n_k, _ in uploads], dtype=np.float64)
    expected = {name: np.average([up.dense[name].astype(np.float64) for up, _, _ in uploads], axis=0, weights=n)
                for name in previous.dense}
    for name, (prev_a, prev_b) in previous.lora.items():
        rank = prev_a.shape[0]
        factors = [(up.lora[name][0].astype(np.float64), up.lora[name][1].astype(np.float64)) for up, _, _ in uploads]
        if rule == "fedavg":
            expected[name] = (np.average([a for a, _ in factors], axis=0, weights=n),
                              np.average([b for _, b in factors], axis=0, weights=n))
        elif rule == "hetlora":
            s = np.array([np.linalg.norm(b @ a) for a, b in factors])
            padded = [pad(a, b, rank) for a, b in factors]
            expected[name] = (np.average([a for a, _ in padded], axis=0, weights=s),
                              np.average([b for _, b in padded], axis=0, weights=s))
        elif rule == "hlora":  # sum_k w_k B_k A_k, at most rank R: its best rank-R approximation (Eckart-Young)
            u, s, vt = np.linalg.svd(np.average([b @ a for a, b in factors], axis=0, weights=n), full_matrices=False)
            expected[name] = (u[:, :rank] * s[:rank]) @ vt[:rank]
        elif rule == "plora":  # each index moves by the round's sample-weighted mean change; skipping it is 0
            a_new, b_new = prev_a.astype(np.float64).copy(), prev_b.astype(np.float64).copy()
            for j in range(rank):
                for k, (_, _, idx) in enumerate(uploads):
                    if j in idx:
                        pos = idx.index(j)
                        a_new[j] += n[k] / n.sum() * (factors[k][0][pos] - prev_a[j])
                        b_new[:, j] += n[k] / n.sum() * (factors[k][1][:, pos] - prev_b[:, j])
            expected[name] = (a_new, b_new)
    return expected


def assert_matches_reference(rule, got: Adapter, expected: dict):
    for name, value in expected.items():
        if name in got.dense:
            np.testing.assert_allclose(got.dense[name], value, rtol=1e-5, atol=1e-6)
        elif rule == "hlora":
            a, b = got.lora[name]
            np.testing.assert_allclose(b.astype(np.float64) @ a, value, rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_allclose(got.lora[name][0], value[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.lora[name][1], value[1], rtol=1e-5, atol=1e-6)
