"""Simulate a heterogeneous fleet federating LoRA on real data, on this machine (the main job).

Starts a real server and real client processes on loopback. The clients present device profiles
drawn from the catalog (profiles/devices/), so the tier policy gives them different ranks.
--task chat (the default): SmolLM2-135M-Instruct learns to reply like the people whose chats stay on the
devices, one person per device (the bundled Chit Chat corpus); every global version's perplexity is measured
on replies of people outside the fleet and on held-out conversations of the fleet's own people; round 0 is
the base model (zero-shot). About 10 minutes on 2 cores.
--task classification: all-MiniLM-L6-v2 on a non-IID split of BANKING77 intents; accuracy and
macro-F1 on the test set. About 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from hetlora.argtypes import positive_int_list
from hetlora.demo_data import banking77
from hetlora.protocol.settings import LR_DECAYS
from hetlora.engine.aggregation import RULES
from hetlora.engine.aggregation.robust import ROBUST
from simulation.demo import (CHAT_TRAINING, DEMO_TRAINING, DemoConfig, TASKS, federated_run, format_table, methods_for,
                             model_task, plot_rows, rows_json)
from hetlora.models.bundled import default_model_dir
from hetlora.models.folders import check_model_dir
from simulation.energy import write_energy

# Rows of each chat evaluation set: a 135M model scores about 100 rows in 15 s on one busy core.
CHAT_EVAL_ROWS = 100
# Per-task defaults of the flags marked None below (the chat run is sized for 10 minutes on 2 cores).
TASK_DEFAULTS = {
    "classification": {"training": DEMO_TRAINING, "rounds": 6, "head_init": "lda", "head_rounds": 20},
    "chat": {"training": CHAT_TRAINING, "rounds": 5, "head_init": "none", "head_rounds": 0},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASKS, default="chat",
                   help="chat (default: a language model on people's chats) or classification (BANKING77 intents)")
    p.add_argument("--model", help="base model folder (default: all-MiniLM-L6-v2 / SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="training data, split across the clients (default: the bundled BANKING77 train "
                                  "split / Chit Chat replies; chat rows: prompt,response[,user])")
    p.add_argument("--test", help="test data (default: the bundled BANKING77 test split / for chat, replies of "
                                  "people outside the fleet and held-out conversations of its people)")
    p.add_argument("--labels", help="classification label list, JSON list or lines (default: the bundled intents)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", help="label column (default: 'label', or 'category')")
    p.add_argument("--min-replies", type=int, default=DemoConfig.min_replies,
                   help="chat: replies a person needs to become a device")
    p.add_argument("--aggregator", choices=RULES, default="hetlora")
    p.add_argument("--compare", action="store_true", help="run fedavg at the smallest and largest rank, hetlora, "
                                                          "hlora, plora and centralized LoRA on the same split")
    p.add_argument("--clients", type=int, default=8, help="simulated devices (default 8)")
    p.add_argument("--clients-per-round", type=int, default=4)
    p.add_argument("--rounds", type=int, help="LoRA rounds (default 6; chat 5)")
    g = p.add_argument_group("local training (defaults per task: classification / chat)")
    pick = lambda name: f"{getattr(DEMO_TRAINING, name)} / {getattr(CHAT_TRAINING, name)}"  # noqa: E731
    g.add_argument("--local-steps", type=int, help=f"steps per round ({pick('steps')})")
    g.add_argument("--batch-size", type=int, help=f"({pick('batch_size')})")
    g.add_argument("--seq-len", type=int, help=f"({pick('seq_len')})")
    g.add_argument("--lr", type=float, help=f"learning rate of the LoRA factors ({pick('lr')})")
    g.add_argument("--head-lr", type=float, help=f"learning rate of the head ({DEMO_TRAINING.head_lr})")
    g.add_argument("--schedule", choices=("constant", "cosine"), help="learning-rate schedule over each round's "
                                                                      "local steps (cosine)")
    g.add_argument("--warmup-steps", type=int, help=f"({pick('warmup_steps')})")
    p.add_argument("--head-init", choices=("none", "ncm", "lda"),
                   help="round 0 sets the head from the clients' class statistics (default lda; chat: none)")
    p.add_argument("--head-rounds", type=int,
                   help="head rounds after round 0: every client fits the head on its frozen features, the server "
                        "averages the heads (default 20; chat 0)")
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
                   help="evaluate on validation data instead of the test set, for choosing settings: this share of "
                        "the training rows (classification), or the validation conversations (chat, any value > 0)")
    p.add_argument("--ranks", type=positive_int_list, default=(4, 8, 16, 32), help="rank set (default 4,8,16,32)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    p.add_argument("--eval-rows", type=int, help="evaluate on this many rows of each held-out set (default: all; "
                                                 f"chat {CHAT_EVAL_ROWS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run folder (default: runs/demo-<time>)")
    p.add_argument("--json", action="store_true", help="print the result rows as JSON")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The run's DemoConfig: the flags given, the task's defaults for the rest."""
    defaults = TASK_DEFAULTS[args.task]
    base = defaults["training"]
    given = {"steps": args.local_steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
             "head_lr": args.head_lr, "schedule": args.schedule, "warmup_steps": args.warmup_steps}
    training = replace(base, head_epochs=args.head_epochs, head_fit_lr=args.head_fit_lr,
                       **{k: v for k, v in given.items() if v is not None})
    head_init = args.head_init or defaults["head_init"]
    chat = args.task == "chat"
    return DemoConfig(
        model_dir=str(check_model_dir(args.model or default_model_dir(model_task(args.task)))),
        data=str(args.data) if args.data else (None if chat else str(banking77("train.csv", "--data"))),
        test=str(args.test) if args.test else (None if chat else str(banking77("test.csv", "--test"))),
        labels=None if chat else str(args.labels or banking77("categories.json", "--labels")),
        out=Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"), task=args.task,
        min_replies=args.min_replies, clients=args.clients, clients_per_round=args.clients_per_round,
        rounds=args.rounds or defaults["rounds"], training=training, head_init=head_init,
        head_rounds=(args.head_rounds if args.head_rounds is not None else defaults["head_rounds"])
        if head_init != "none" else 0,
        lr_decay=args.lr_decay, server_opt=args.server_opt, server_lr=args.server_lr, dirichlet_alpha=args.alpha,
        seed=args.seed, ranks=args.ranks, text_column=args.text_column, label_column=args.label_column,
        validation_fraction=args.validation_fraction, robust=args.robust, adversarial=args.testing_adversarial,
        attack_scale=args.testing_attack_scale)


def run(args: argparse.Namespace) -> int:
    # torch and transformers load when the command runs: its --help and argument errors stay instant
    import torch

    from simulation.centralized import centralized_run
    from simulation.fleets import prepare_fleet

    log = logging.getLogger("hetlora.demo")
    # Every client process trains on one thread; evaluation here runs beside them. More threads than
    # cores make torch's OpenMP workers spin against each other (measured 10x slower steps here).
    torch.set_num_threads(1)
    cfg = config_from_args(args)
    t0 = time.monotonic()
    fleet = prepare_fleet(cfg, eval_rows=args.eval_rows or (CHAT_EVAL_ROWS if cfg.task == "chat" else None))
    rows = []

    def on_row(row):
        rows.append(row)
        shown = ", ".join(f"{key} {getattr(row, key):.3f}" for key in ("accuracy", "macro_f1", "perplexity",
                                                                         "personal_perplexity")
                          if getattr(row, key) is not None)
        log.info("%-12s round %d: %s, mean rank %.1f (%.0f s)", row.method, row.round, shown, row.mean_rank,
                 row.seconds)

    for method in methods_for(args.aggregator, args.compare, cfg.ranks):
        federated_run(cfg, method, fleet, on_row)
    if args.compare:
        centralized_run(cfg, fleet, on_row)
    (cfg.out / "results.json").write_text(json.dumps(rows_json(rows), indent=2) + "\n")
    plot = plot_rows(rows, cfg.out / "convergence.png", cfg.task)
    tiers, energy_plot = write_energy(rows, cfg.out, cfg.task)
    if args.json:
        print(json.dumps(rows_json(rows), indent=2))
        return 0
    print(format_table(rows, cfg.task))
    print(f"\n{tiers}\n")
    for device, why in fleet.excluded.items():
        print(f"not in the fleet: {device}, the tier policy rules it out ({why})")
    plots = "".join(f", {p.name}" for p in (plot, energy_plot) if p)
    print(f"\nrun folder: {cfg.out}  (results.json, energy.json{plots}, server and client logs)")
    if cfg.task == "chat":
        start, last = rows[0], [r for r in rows if r.method == rows[0].method][-1]
        print(f"total {time.monotonic() - t0:.0f} s; perplexity {start.perplexity:.1f} (zero-shot) -> "
              f"{last.perplexity:.1f} ({last.perplexity / start.perplexity:.2f}x)")
    else:
        print(f"total {time.monotonic() - t0:.0f} s; chance accuracy {1 / len(fleet.labels):.3f}")
    return 0
