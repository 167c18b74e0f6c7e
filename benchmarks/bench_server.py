"""One federated round through the real HTTP server: download, upload and aggregation time per rule.

    .venv/bin/python benchmarks/bench_server.py              # K = 10 clients, all-MiniLM-L6-v2 spec
    .venv/bin/python benchmarks/bench_server.py --clients 20 --targets query,value

The server runs in a background thread on loopback with SQLite state in a temp dir. K clients
with ranks cycling through 4, 8, 16, 32, 64 (fedavg: all 64) register, download their adapter,
and upload random factors (numpy, no training). "round close" is the wall time of the last
upload, which includes validating, storing, aggregating and committing the new global.
One run per cell on a shared machine: compare rows, not absolute times. Under a load of ~12 on
2 cores, hlora's round close took 38.6 s with default OpenBLAS threads and 3.4 s with
OPENBLAS_NUM_THREADS=1 (spin-waiting BLAS threads; see bench_aggregate.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import httpx
import numpy as np

from hetlora.models.adapter_spec import derive_spec
from hetlora.models.bundled import default_model_dir
from hetlora.protocol.wire import Adapter, encode
from server_stub.background import serve_in_background
from hetlora.demo_data import banking77
from hetlora.labels import read_labels
from hetlora.engine.config import ServerConfig

RANKS = (4, 8, 16, 32, 64)


def random_update(spec, rank: int, meta: dict, rng) -> bytes:
    lora = {name: (rng.normal(0, 0.02, (rank, m.in_features)).astype(np.float32),
                   rng.normal(0, 0.02, (m.out_features, rank)).astype(np.float32)) for name, m in spec.modules.items()}
    dense = {name: rng.normal(0, 0.02, shape).astype(np.float32) for name, shape in spec.dense.items()}
    return encode(Adapter(lora=lora, dense=dense, meta=meta))


def one_round(spec, labels, rule: str, k: int) -> dict:
    config = ServerConfig(spec=spec, aggregator=rule, labels=labels, ranks=RANKS, global_rank=max(RANKS),
                          min_clients=k, rounds=1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as state, serve_in_background(config, state) as url, \
            httpx.Client(base_url=url, timeout=600) as http:
        clients = []
        for i in range(k):
            reply = http.post("/v1/register", json={"profile": {}, "requested_rank": RANKS[i % len(RANKS)],
                                                    "n_samples": 100 + i}).json()
            clients.append((reply, {"Authorization": f"Bearer {reply['token']}"}))
        downloads, uploads, up_bytes = [], [], 0
        bodies = []
        for reply, auth in clients:
            info = http.get("/v1/round", headers=auth).json()
            t0 = time.perf_counter()
            http.get("/v1/rounds/1/adapter", headers=auth).raise_for_status()
            downloads.append(time.perf_counter() - t0)
            meta = {"round": 1, "client_id": reply["client_id"], "rank": info["rank"], "effective_rank": info["rank"],
                    "n_samples": 100, "indices": info["indices"]}
            bodies.append(random_update(spec, info["rank"], meta, rng))
        for (_, auth), body in zip(clients, bodies):
            t0 = time.perf_counter()
            http.post("/v1/rounds/1/update", content=body, headers=auth).raise_for_status()
            uploads.append(time.perf_counter() - t0)
            up_bytes += len(body)
        assert http.get("/v1/status").json()["finished"]
    return {"download_ms": 1000 * statistics.median(downloads), "upload_ms": 1000 * statistics.median(uploads[:-1]),
            "close_s": uploads[-1], "up_mb": up_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--targets", help="LoRA targets, comma-separated (default: the model type's)")
    args = parser.parse_args()
    labels = read_labels(banking77("categories.json", "--labels"))
    targets = tuple(args.targets.split(",")) if args.targets else None
    spec = derive_spec(default_model_dir(), "classification", targets, num_labels=len(labels))
    print(f"all-MiniLM-L6-v2, {len(spec.modules)} LoRA modules, {len(labels)} labels, K = {args.clients}, "
          f"ranks {RANKS} (fedavg: 64)")
    print(f"{'rule':<8} {'download ms':>12} {'upload ms':>10} {'round close s':>14} {'uploaded MB':>12}")
    for rule in ("fedavg", "hetlora", "hlora", "plora"):
        row = one_round(spec, labels, rule, args.clients)
        print(f"{rule:<8} {row['download_ms']:>12.1f} {row['upload_ms']:>10.1f} {row['close_s']:>14.2f} "
              f"{row['up_mb']:>12.1f}")


if __name__ == "__main__":
    main()
