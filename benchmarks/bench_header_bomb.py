"""A safetensors header bomb against a real `hetlora serve` (issue 26): time to refuse, server RSS growth, and how
long another client's GET /v1/round waits meanwhile.

The bomb is the audit's: an authenticated upload whose header lists 800,000 tensors (60 MB). It is sent with a
Content-Length, then chunked (no length: the server counts while it streams), and a smaller header within the
run's upload size but with more tensors than the spec has. The server runs the default model (all-MiniLM-L6-v2,
BANKING77 labels) in its own process; RSS is read from /proc/<pid>/status (VmRSS now, VmHWM the peak).

    python benchmarks/bench_header_bomb.py [--tensors 800000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx

from simulation.fleet import start_server


def bomb(tensors: int) -> bytes:
    header = {f"t{k}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * k, 4 * k + 4]} for k in range(tensors)}
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + b"\0" * (4 * tensors)


def memory_mb(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def attack(url: str, auth: dict, other: dict, body, headers: dict) -> tuple[str, float, float]:
    """(answer, seconds to it, seconds another client's GET /v1/round took meanwhile)."""
    result = {}

    def send():
        t0 = time.perf_counter()
        try:
            reply = httpx.post(f"{url}/v1/rounds/1/update", content=body, headers=auth | headers, timeout=120)
            result["answer"] = f"{reply.status_code} {reply.json()['error']['code']}"
        except httpx.TransportError as exc:
            result["answer"] = f"connection closed ({type(exc).__name__})"
        result["seconds"] = time.perf_counter() - t0
    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    httpx.get(f"{url}/v1/round", headers=other, timeout=120).raise_for_status()
    held = time.perf_counter() - t0
    thread.join()
    return result["answer"], result["seconds"], held


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", type=int, default=800_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_server(["--min-clients", "2", "--head-init", "none"], Path(tmp) / "state")
        try:
            auths = []
            for name in ("attacker", "other"):
                reply = httpx.post(f"{url}/v1/register", json={"profile": {}, "requested_rank": 8, "n_samples": 100,
                                                               "name": name}).json()
                auths.append({"Authorization": f"Bearer {reply['token']}"})
            big = bomb(args.tensors)
            cases = [(f"{args.tensors:,} tensors, {len(big) / 1e6:.0f} MB, Content-Length", big, {}),
                     (f"{args.tensors:,} tensors, {len(big) / 1e6:.0f} MB, chunked", iter([big[i:i + 2**20] for i in
                                                                                          range(0, len(big), 2**20)]), {}),
                     ("2,000 tensors, 150 kB (within the upload size)", bomb(2_000), {})]
            print(f"server pid {server.proc.pid}: {memory_mb(server.proc.pid)}")
            print("| bomb | answer | refused in | other client's GET /v1/round | server RSS growth (peak) |")
            print("|---|---|---|---|---|")
            for label, body, headers in cases:
                before = memory_mb(server.proc.pid)
                answer, seconds, held = attack(url, auths[0], auths[1], body, headers)
                after = memory_mb(server.proc.pid)
                print(f"| {label} | {answer} | {seconds * 1000:.0f} ms | {held * 1000:.0f} ms | "
                      f"{after['VmRSS'] - before['VmRSS']:+.1f} MB ({after['VmHWM'] - before['VmHWM']:+.1f} MB) |")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
