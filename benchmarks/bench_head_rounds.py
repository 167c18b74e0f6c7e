"""Head rounds on cached frozen features: how the local loss decides what federated head fitting reaches.

The demo's non-IID fleet (Dirichlet label split), every client's frozen features computed once; then
H simulated head rounds in process with the product's own pieces (edge_client.head_fit.fit_head on
each client, hetlora.engine.aggregation.head_fit.average_heads on the server), from round 0's closed-form
LDA head, for three local losses:

  plain       cross-entropy (a = 0)
  restricted  the classes a client has not seen masked out (a_c = -inf for them, 0 otherwise; FedRS-like)
  adjusted    the logit-adjusted loss the product uses (a_c = log pi_local - log pi_pooled)

and, as the reference, logistic regression on the pooled features (the frozen linear probe; C chosen on
a tenth of the training rows). Prints accuracy after selected rounds on the evaluation rows.

    .venv/bin/python benchmarks/bench_head_rounds.py --validation-fraction 0.1     # tuning: held-out training rows
    .venv/bin/python benchmarks/bench_head_rounds.py --seeds 0,1,2                 # the test set
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulation.demo import DEMO_TRAINING, DemoConfig  # noqa: E402
from simulation.fleets import prepare_fleet  # noqa: E402

DATA = REPO / "hetlora" / "data" / "banking77"
LOSSES = ("plain", "restricted", "adjusted")
SHOWN = (1, 5, 10, 20, 30)


def client_features(cfg: DemoConfig, fleet):
    """[(features, labels)] per client, (features, labels) of the evaluation rows, and the trainer's spec."""
    from edge_client.data import load_examples
    from edge_client.training import TorchTrainer

    trainer = TorchTrainer(cfg.model_dir, "classification", labels=fleet.labels)
    seq_len = cfg.training.seq_len
    clients = [trainer.frozen_features(load_examples(p, "classification", fleet.labels), seq_len) for p in fleet.parts]
    return clients, trainer.frozen_features(fleet.test, seq_len)


def adjustment(loss: str, labels: np.ndarray, num_labels: int, pooled_counts) -> np.ndarray:
    from edge_client.head_fit import logit_adjustment

    if loss == "plain":
        return np.zeros(num_labels)
    if loss == "restricted":
        return np.where(np.bincount(labels, minlength=num_labels) > 0, 0.0, -np.inf)
    return logit_adjustment(labels, num_labels, pooled_counts)


def simulate(loss: str, start, clients, evaluation, rounds: int, seed: int) -> dict[int, float]:
    """Accuracy on `evaluation` after each of `rounds` head rounds (every client, every round)."""
    from edge_client.head_fit import fit_head
    from hetlora.protocol.wire import Adapter
    from hetlora.engine.aggregation import ClientResult
    from hetlora.engine.aggregation.head_fit import average_heads

    weight, bias = start
    counts = sum(np.bincount(y, minlength=len(bias)) for _, y in clients)
    current = Adapter(lora={}, dense={"w": weight, "b": bias})
    accuracy = {}
    for number in range(1, rounds + 1):
        results = []
        for k, (x, y) in enumerate(clients):
            fit = fit_head(current.dense["w"], current.dense["b"], x, y, adjustment(loss, y, len(bias), counts),
                           epochs=DEMO_TRAINING.head_epochs, lr=DEMO_TRAINING.head_fit_lr,
                           batch_size=DEMO_TRAINING.batch_size, seed=seed * 1000 + number * 10 + k)
            results.append(ClientResult(Adapter(lora={}, dense={"w": fit.weight, "b": fit.bias}), n_samples=len(y)))
        current, _ = average_heads(current, results)
        accuracy[number] = head_accuracy(current.dense["w"], current.dense["b"], *evaluation)
    return accuracy


def head_accuracy(weight, bias, features, labels) -> float:
    return float(np.mean(np.argmax(features @ weight.T + bias, axis=1) == labels))


def probe(clients, evaluation, seed: int) -> float:
    """The frozen linear probe (bench_quality.fit_probe) on the pooled client features, scored on `evaluation`."""
    from bench_quality import fit_probe

    x, y = np.concatenate([c[0] for c in clients]), np.concatenate([c[1] for c in clients])
    return float(fit_probe(x, y, seed).score(*evaluation))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--validation-fraction", type=float, default=0.0)
    p.add_argument("--out", default="runs/bench-head-rounds")
    args = p.parse_args()
    from hetlora.output import configure

    configure(-1)  # third-party import chatter (torchao, pytree) off, as in the hetlora command
    import torch

    from hetlora.models.bundled import default_model_dir
    from hetlora.protocol.head_stats import class_statistics
    from hetlora.engine.aggregation.head_init import DEFAULT_SHRINKAGE, DEFAULT_TEMPERATURE, class_head

    torch.set_num_threads(2)
    shown = [r for r in SHOWN if r <= args.rounds]
    rows = {name: [] for name in ("lda (round 0)", *LOSSES, "probe")}
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = DemoConfig(model_dir=str(default_model_dir()), data=str(DATA / "train.csv"), test=str(DATA / "test.csv"),
                         labels=str(DATA / "categories.json"), out=Path(args.out) / f"seed{seed}", seed=seed,
                         validation_fraction=args.validation_fraction)
        fleet = prepare_fleet(cfg)
        clients, evaluation = client_features(cfg, fleet)
        pooled = class_statistics(np.concatenate([c[0] for c in clients]), np.concatenate([c[1] for c in clients]),
                                  len(fleet.labels))
        start = class_head(pooled, "lda", shrinkage=DEFAULT_SHRINKAGE, temperature=DEFAULT_TEMPERATURE)
        rows["lda (round 0)"].append({r: head_accuracy(*start, *evaluation) for r in shown})
        for loss in LOSSES:
            rows[loss].append(simulate(loss, start, clients, evaluation, args.rounds, seed))
            print(f"seed {seed} {loss}: {rows[loss][-1][args.rounds]:.3f} after {args.rounds} rounds", flush=True)
        rows["probe"].append({r: probe(clients, evaluation, seed) for r in shown})
    where = "validation" if args.validation_fraction else "test"
    print(f"\naccuracy on the {where} rows after n head rounds (mean +- sd over seeds {args.seeds})\n")
    print("| local loss | " + " | ".join(f"n = {r}" for r in shown) + " |")
    print("|---|" + "---|" * len(shown))
    for name, runs in rows.items():
        cells = [f"{np.mean([run[r] for run in runs]):.3f} ± {np.std([run[r] for run in runs]):.3f}" for r in shown]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
