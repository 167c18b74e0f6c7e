"""Simulate a heterogeneous fleet federating LoRA on real data, on this machine (the main job).

Starts a real server and real client processes on loopback. The clients present device profiles
drawn from the catalog (profiles/devices/), so the tier policy gives them different ranks; they
train on a non-IID split of the data. Every global version is evaluated on the test set.
Defaults: all-MiniLM-L6-v2 on BANKING77 intent classification, about 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from hetlora.argtypes import positive_int_list
from hetlora.demo_data import banking77
from hetlora.protocol.settings import LR_DECAYS
from server_stub.aggregation import RULES
from server_stub.aggregation.robust import ROBUST
from simulation.demo import DEMO_TRAINING, DemoConfig



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--data", help="training data, split across the clients (default: the bundled BANKING77 train split)")
    p.add_argument("--test", help="test data for the global adapter (default: the bundled BANKING77 test split)")
    p.add_argument("--labels", help="label list, JSON list or lines (default: the bundled BANKING77 intents)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", help="label column (default: 'label', or 'category')")
    p.add_argument("--aggregator", choices=RULES, default="hetlora")
    p.add_argument("--compare", action="store_true", help="run fedavg at the smallest and largest rank, hetlora, "
                                                          "hlora, plora and centralized LoRA on the same split")
    p.add_argument("--clients", type=int, default=8, help="simulated devices (default 8)")
    p.add_argument("--clients-per-round", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=DEMO_TRAINING.steps)
    p.add_argument("--batch-size", type=int, default=DEMO_TRAINING.batch_size)
    p.add_argument("--seq-len", type=int, default=DEMO_TRAINING.seq_len)
    p.add_argument("--lr", type=float, default=DEMO_TRAINING.lr, help="learning rate of the LoRA factors")
    p.add_argument("--head-lr", type=float, default=DEMO_TRAINING.head_lr, help="learning rate of the head")
    p.add_argument("--schedule", choices=("constant", "cosine"), default=DEMO_TRAINING.schedule,
                   help="learning-rate schedule over each round's local steps")
    p.add_argument("--warmup-steps", type=int, default=DEMO_TRAINING.warmup_steps)
    p.add_argument("--head-init", choices=("none", "ncm", "lda"), default=DemoConfig.head_init,
                   help="round 0 sets the head from the clients' class statistics (default lda; none = random head)")
    p.add_argument("--head-rounds", type=int, default=DemoConfig.head_rounds,
                   help=f"head rounds after round 0: every client fits the head on its frozen features, the server "
                        f"averages the heads (default {DemoConfig.head_rounds}; 0 = LoRA right after round 0)")
    p.add_argument("--head-epochs", type=int, default=DEMO_TRAINING.head_epochs,
                   help="passes over its frozen features a client makes per head round")
    p.add_argument("--head-fit-lr", type=float, default=DEMO_TRAINING.head_fit_lr,
                   help="Adam learning rate of the head rounds")
    p.add_argument("--lr-decay", choices=LR_DECAYS, default=DemoConfig.lr_decay,
                   help="learning rates across the LoRA rounds: cosine = round t of T at lr * (1 + cos(pi t / T)) / 2")
    p.add_argument("--server-opt", choices=("none", "momentum", "adam", "yogi"), default=DemoConfig.server_opt,
                   help="server optimiser on each round's aggregated update (hlora: momentum only)")
    p.add_argument("--server-lr", type=float, default=DemoConfig.server_lr)
    p.add_argument("--robust", choices=ROBUST, default="none",
                   help="robust aggregation on the server (hetlora serve --robust)")
    # TEST TOOL, hidden: the first N clients by name become x S model-replacement attackers (docs/RESULTS.md).
    p.add_argument("--testing-adversarial", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--testing-attack-scale", type=float, default=100.0, help=argparse.SUPPRESS)
    p.add_argument("--validation-fraction", type=float, default=0.0,
                   help="hold out this share of the training rows and evaluate on it instead of --test "
                        "(for choosing hyperparameters without looking at the test set)")
    p.add_argument("--ranks", type=positive_int_list, default=(4, 8, 16, 32), help="rank set (default 4,8,16,32)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    p.add_argument("--eval-rows", type=int, help="evaluate on this many test rows (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run folder (default: runs/demo-<time>)")
    p.add_argument("--json", action="store_true", help="print the result rows as JSON")


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    import time

    import torch

    from simulation.demo import (DemoConfig, centralized_run, federated_run, format_table, methods_for,
                                  plot_rows, prepare_fleet, rows_json)
    from edge_client.models import check_model_dir, default_model_dir

    log = logging.getLogger("hetlora.demo")
    # Every client process trains on one thread; evaluation here runs beside them. More threads than
    # cores make torch's OpenMP workers spin against each other (measured 10x slower steps here).
    torch.set_num_threads(1)
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    model_dir = str(check_model_dir(args.model or default_model_dir()))
    data = str(args.data or banking77("train.csv", "--data"))
    test = str(args.test or banking77("test.csv", "--test"))
    labels = str(args.labels or banking77("categories.json", "--labels"))
    cfg = DemoConfig(model_dir=model_dir, data=data, test=test, labels=labels, out=out,
                     clients=args.clients, clients_per_round=args.clients_per_round, rounds=args.rounds,
                     training=replace(DEMO_TRAINING, steps=args.local_steps, batch_size=args.batch_size,
                                      seq_len=args.seq_len, lr=args.lr, head_lr=args.head_lr, schedule=args.schedule,
                                      warmup_steps=args.warmup_steps, head_epochs=args.head_epochs,
                                      head_fit_lr=args.head_fit_lr),
                     head_init=args.head_init, head_rounds=args.head_rounds if args.head_init != "none" else 0,
                     lr_decay=args.lr_decay, server_opt=args.server_opt, server_lr=args.server_lr,
                     dirichlet_alpha=args.alpha, seed=args.seed, ranks=args.ranks,
                     text_column=args.text_column, label_column=args.label_column,
                     validation_fraction=args.validation_fraction, robust=args.robust,
                     adversarial=args.testing_adversarial, attack_scale=args.testing_attack_scale)
    t0 = time.monotonic()
    fleet = prepare_fleet(cfg, eval_rows=args.eval_rows)
    rows = []

    def on_row(row):
        rows.append(row)
        log.info("%-12s round %d: accuracy %.3f, macro-F1 %.3f, mean rank %.1f (%.0f s)", row.method, row.round,
                 row.accuracy, row.macro_f1, row.mean_rank, row.seconds)

    for method in methods_for(args.aggregator, args.compare, cfg.ranks):
        federated_run(cfg, method, fleet.parts, fleet.profiles, fleet.evaluate, on_row)
    if args.compare:
        centralized_run(cfg, fleet.labels, fleet.pooled, fleet.evaluate, on_row)
    (out / "results.json").write_text(json.dumps(rows_json(rows), indent=2) + "\n")
    plot = plot_rows(rows, out / "convergence.png")
    if args.json:
        print(json.dumps(rows_json(rows), indent=2))
    else:
        print(format_table(rows))
        print(f"\nrun folder: {out}  (results.json{', convergence.png' if plot else ''}, server and client logs)")
        print(f"total {time.monotonic() - t0:.0f} s; chance accuracy {1 / len(fleet.labels):.3f}")
    return 0
