"""The Flower app under Flower's simulation runtime: N virtual catalog devices, a tiny model, few steps.

Needs the `flower-sim` extra (Ray). Starts a SuperLink in simulation mode on loopback, runs
`flwr run flower_app local --federation-config num-supernodes=N`, and samples the resident memory of
every process of the federation (SuperLink, ServerApp, Ray and its workers) twice a second.
Virtual node k trains on file k of a Dirichlet(0.5) split of BANKING77 (`hetlora partition`) as device k
of `profiles.catalog.simulated_fleet(N, seed)`, so the tier policy gives the fleet several ranks.

    .venv/bin/python benchmarks/bench_flower_sim.py --nodes 100 --rounds 2 --steps 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_model(path: Path) -> Path:
    """A 2-layer BERT (hidden 32, random weights) with the default model's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from hetlora.models.bundled import default_model_dir

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=128)).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (default_model_dir() / name).exists():
            shutil.copy(default_model_dir() / name, path / name)
    return path


class PeakMemory:
    """Highest sum of RSS over the federation's processes, sampled every `period` seconds."""

    def __init__(self, federation, period: float = 0.5):
        self.federation, self.period, self.peak, self.peak_processes = federation, period, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import psutil

        while not self._stop.wait(self.period):
            total, members = 0, self.federation.members()
            for proc in members:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            if total > self.peak:
                self.peak, self.peak_processes = total, len(members)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="local steps per round")
    parser.add_argument("--rule", default="hetlora")
    parser.add_argument("--head-init", default="ncm", help="none | ncm | lda (round 0 before the LoRA rounds)")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="Ray CPUs per virtual node (actors in parallel "
                        "= cores / this)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from hetlora_flower.local import LocalFederation

    work = Path(tempfile.mkdtemp(prefix="bench-flower-sim-"))
    model = tiny_model(work / "tiny-bert")
    subprocess.run([sys.executable, "-m", "hetlora.cli", "partition", "--data", str(ROOT / "hetlora/data/banking77/train.csv"),
                    "--clients", str(args.nodes), "--alpha", "0.5", "--out", str(work / "parts")], check=True,
                   stdout=subprocess.DEVNULL)
    run_config = {"rule": args.rule, "num-server-rounds": args.rounds, "ranks": "4,8,16", "global-rank": 16,
                  "min-clients": args.nodes, "local-steps": args.steps, "batch-size": 8, "seq-len": 32,
                  "model": str(model), "labels": str(ROOT / "hetlora/data/banking77/categories.json"),
                  "head-init": args.head_init, "partition-dir": str(work / "parts"), "output-dir": str(work / "out")}
    with LocalFederation(work / "federation") as fed:
        fed.superlink(simulation=True)
        with PeakMemory(fed) as memory:
            t0 = time.perf_counter()
            done = fed.run(ROOT / "flower_app", run_config, timeout=args.timeout,
                           federation_config={"num-supernodes": args.nodes,
                                              "client-resources-num-cpus": args.cpus_per_node})
            wall = time.perf_counter() - t0
    history = work / "out" / "history.json"
    if done.returncode != 0 or not history.is_file():
        print(f"the simulation failed (exit {done.returncode}); logs in {work / 'federation'}", file=sys.stderr)
        return 1
    print_report(args, json.loads(history.read_text()), wall, memory, as_json=args.json)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def print_report(args, history: dict, wall: float, memory: PeakMemory, as_json: bool) -> None:
    rounds = history["rounds"]
    ranks = sorted({r for rnd in rounds for r in rnd["ranks"].values()})
    row = {"virtual_nodes": args.nodes, "rounds": len(rounds), "rule": args.rule, "head_init": args.head_init,
           "local_steps": args.steps, "clients_per_round": [len(r["clients"]) for r in rounds], "ranks": ranks,
           "wall_s": round(wall, 1), "peak_rss_mib": round(memory.peak / 2**20), "processes_at_peak":
           memory.peak_processes, "cpus": _cpus()}
    if as_json:
        print(json.dumps(row, indent=2))
        return
    print("| virtual nodes | rounds | rule | steps | updates per round | ranks | wall (s) | peak RSS (MiB) "
          "| procs | cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['virtual_nodes']} | {row['rounds']} | {row['rule']} | {row['local_steps']} | "
          f"{','.join(map(str, row['clients_per_round']))} | {','.join(map(str, ranks))} | {row['wall_s']} | "
          f"{row['peak_rss_mib']} | {row['processes_at_peak']} | {row['cpus']} |")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
