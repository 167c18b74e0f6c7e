"""Aggregation time per rule, and hlora's factored SVD against a dense reference.

    .venv/bin/python benchmarks/bench_aggregate.py            # K = 20, 100; MiniLM, 2048, 4096
    .venv/bin/python benchmarks/bench_aggregate.py --quick    # K = 20; MiniLM, 2048

Clients get ranks drawn uniformly from 4..64 (global rank 64); fedavg needs one rank, so its
clients are all at 64. "dense" forms sum_k (n_k/n) B_k A_k (out x in) and runs np.linalg.svd on it,
which is what hlora would do without the factored form. One timed run per cell: the machine is
shared and noisy, so read the ratios, not the absolute times. When other processes keep the
cores busy, multi-threaded OpenBLAS spin-waits and the many mid-sized calls of the factored path
suffer most (measured here: a 2048 x 726 QR took 20x longer with 2 threads than with 1 under a
load of 13); then run it single-threaded:

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_aggregate.py
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from hetlora.protocol.plan import Tier
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.spec import AdapterSpec, LoRAModule
from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation import RULES, ClientResult, make_rule

GLOBAL_RANK = 64
RANK_RANGE = (4, 64)


def minilm_spec() -> AdapterSpec:
    """The 36 linear layers of MiniLM-L6 (hidden 384, intermediate 1536, 6 layers)."""
    shapes = {"attention.self.query": (384, 384), "attention.self.key": (384, 384),
              "attention.self.value": (384, 384), "attention.output.dense": (384, 384),
              "intermediate.dense": (384, 1536), "output.dense": (1536, 384)}
    modules = {}
    for layer in range(6):
        for suffix, (inp, out) in shapes.items():
            name = f"encoder.layer.{layer}.{suffix}"
            modules[name] = LoRAModule(name, inp, out)
    return AdapterSpec("bench", "classification", tuple(shapes), modules)


def square_spec(width: int) -> AdapterSpec:
    return AdapterSpec("bench", "classification", ("proj",), {"proj": LoRAModule("proj", width, width)})


def make_round(rule, spec: AdapterSpec, ranks: list[int], rng: np.random.Generator):
    """A global with nonzero B and one upload per rank (plora: with assigned indices)."""
    global_ = rule.init_global(spec, GLOBAL_RANK, seed=0)
    for _, b in global_.lora.values():
        b[...] = rng.normal(scale=0.01, size=b.shape)
    results = []
    for k, rank in enumerate(ranks):
        lora = {name: (rng.normal(scale=m.in_features ** -0.5, size=(rank, m.in_features)).astype(np.float32),
                       rng.normal(scale=0.01, size=(m.out_features, rank)).astype(np.float32))
                for name, m in spec.modules.items()}
        indices = rule.configure(round_number=1, client_key=f"c{k}", tier=Tier(rank), global_rank=GLOBAL_RANK, seed=0,
                                 training=TrainingSettings()).indices
        results.append(ClientResult(Adapter(lora=lora), int(rng.integers(50, 500)), indices))
    return global_, results


def dense_hlora(global_: Adapter, results: list[ClientResult]) -> dict[str, np.ndarray]:
    """The dense reference: D = sum_k (n_k/n) B_k A_k, then the top-R singular values of np.linalg.svd(D)."""
    n = np.array([r.n_samples for r in results], dtype=np.float64)
    w = n / n.sum()
    singular_values = {}
    for name in global_.lora:
        dense = sum(w_k * (r.adapter.lora[name][1].astype(np.float64) @ r.adapter.lora[name][0].astype(np.float64))
                    for w_k, r in zip(w, results))
        _, s, _ = np.linalg.svd(dense, full_matrices=False)  # U and V too: hlora redistributes them
        singular_values[name] = s[:GLOBAL_RANK]
    return singular_values


def factored_singular_values(new_global: Adapter) -> dict[str, np.ndarray]:
    """Balanced split: ||B[:, j]|| ||A[j]|| = s_j."""
    return {name: np.linalg.norm(b.astype(np.float64), axis=0) * np.linalg.norm(a.astype(np.float64), axis=1)
            for name, (a, b) in new_global.lora.items()}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K = 20 only, skip width 4096")
    parser.add_argument("--clients", type=int, nargs="+", help="client counts (default 20 100)")
    parser.add_argument("--widths", type=int, nargs="+", help="square module widths (default 2048 4096)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense hlora reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    clients = args.clients or ([20] if args.quick else [20, 100])
    widths = args.widths or ([2048] if args.quick else [2048, 4096])
    shapes = [("MiniLM 36 modules", minilm_spec())] + [(f"square {w}", square_spec(w)) for w in widths]

    print(f"global rank {GLOBAL_RANK}, client ranks uniform in {RANK_RANGE[0]}..{RANK_RANGE[1]} (fedavg: all at "
          f"{GLOBAL_RANK}); float64 inside; one run per cell; numpy {np.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, load {os.getloadavg()[0]:.1f}\n")
    header = f"{'modules':<18} {'K':>4} {'sum r':>6} " + " ".join(f"{r + ' s':>10}" for r in RULES)
    header += f" {'hlora dense s':>14} {'dense/fact':>10} {'max |ds|/s1':>12}"
    print(header)
    print("-" * len(header))
    for label, spec in shapes:
        for k in clients:
            rng = np.random.default_rng(args.seed)
            ranks = [int(r) for r in rng.integers(RANK_RANGE[0], RANK_RANGE[1] + 1, size=k)]
            cells, hlora_time, hlora_global, hlora_round = [], 0.0, None, None
            for name in RULES:
                rule = make_rule(name)
                global_, results = make_round(rule, spec, [GLOBAL_RANK] * k if name == "fedavg" else ranks, rng)
                new_global, seconds = timed(rule.aggregate, global_, results)
                cells.append(f"{seconds:>10.3f}")
                if name == "hlora":
                    hlora_time, hlora_global, hlora_round = seconds, new_global, (global_, results)
                del global_, results, new_global
            row = f"{label:<18} {k:>4} {sum(ranks):>6} " + " ".join(cells)
            if args.no_dense:
                print(row, flush=True)
                continue
            dense_s, dense_time = timed(dense_hlora, *hlora_round)
            fact_s = factored_singular_values(hlora_global)
            diff = max(float(np.max(np.abs(fact_s[n] - dense_s[n])) / dense_s[n][0]) for n in dense_s)
            print(f"{row} {dense_time:>14.3f} {dense_time / hlora_time:>10.1f} {diff:>12.1e}", flush=True)
    print("\nmax |ds|/s1: largest gap between the factored and dense top-64 singular values, relative to the "
          "largest (the factored global is stored in float32).")


if __name__ == "__main__":
    main()
