"""The main job: a heterogeneous fleet federates LoRA on real data, on this machine.

For each method a real `hetlora serve` and N real `hetlora client` processes run on loopback;
the clients present device profiles from the catalog (so their ranks come from the tier
policy), train on a non-IID Dirichlet split of the data, and the demo evaluates every global
version on the test set as it appears. `compare` adds the FedAvg baselines at the smallest and
largest rank and centralized LoRA on the pooled data with the same number of local steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from simulation.fleet import start_client, start_server
from edge_client.server_api import ServerAPI
from hetlora.protocol.head_stats import class_statistics
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import decode
from hetlora.errors import UserError

log = logging.getLogger("hetlora.demo")
# The demo's local training: short cosine rounds with a warm-up; after the head rounds the LoRA factors learn at
# half the head's rate (lr 1e-3 was best of 1e-3 and 2e-3 on the validation split, head_lr 0 and 2e-3 tied).
DEMO_TRAINING = TrainingSettings(steps=20, batch_size=16, seq_len=32, lr=1e-3, head_lr=2e-3, schedule="cosine",
                                 warmup_steps=2, prune_lambda=0.01)


@dataclass(frozen=True)
class DemoConfig:
    model_dir: str
    data: str
    test: str
    labels: str
    out: Path
    clients: int = 8
    clients_per_round: int = 4
    rounds: int = 6
    training: TrainingSettings = DEMO_TRAINING  # sent by each run's server; prune_lambda: hetlora runs only
    head_init: str = "lda"
    head_rounds: int = 20
    lr_decay: str = "none"  # none | cosine over the LoRA rounds (hetlora serve --lr-decay)
    server_opt: str = "none"
    server_lr: float = 1.0
    dirichlet_alpha: float = 0.5
    seed: int = 0
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    round_deadline: float = 600.0
    text_column: str = "text"
    label_column: str | None = None
    validation_fraction: float = 0.0  # > 0: hold out this share of the training rows and evaluate on it
    robust: str = "none"  # hetlora serve --robust
    adversarial: int = 0  # TEST TOOL: the first N clients (by name) upload their updates scaled by attack_scale
    attack_scale: float = 100.0


@dataclass(frozen=True)
class Method:
    """One row group of the comparison: an aggregation rule, the rank set it runs with, and extra
    `hetlora serve` options (later flags override the demo's)."""

    label: str
    aggregator: str
    ranks: tuple[int, ...]
    options: tuple[str, ...] = ()


@dataclass
class RoundRow:
    method: str
    round: int
    accuracy: float
    macro_f1: float
    mean_rank: float
    bytes_up: int
    bytes_down: int
    seconds: float
    stage: str = "lora"  # head-statistics (round 0) | head-fit (the head rounds, one row) | lora


@dataclass
class Fleet:
    """Everything the runs share: the label list, per-client data files and device profiles,
    the pooled data (centralized baseline), the test (or validation) examples and their evaluation."""

    labels: list[str]
    parts: list[Path]
    profiles: list[Path]
    pooled: object
    test: object
    evaluate: Callable[[object], dict]


def prepare_fleet(cfg: DemoConfig, eval_rows: int | None = None) -> Fleet:
    """Split the data non-IID (Dirichlet over labels), draw device profiles from the catalog, load the test set."""
    import json


    from edge_client.data import label_column_of, load_examples, read_rows
    from hetlora.labels import read_labels
    from edge_client.evaluate import Evaluator
    from edge_client.partition import dirichlet_partition, summarize, write_rows
    from profiles.catalog import simulated_fleet

    labels = read_labels(cfg.labels)
    columns, rows = read_rows(cfg.data)
    column = label_column_of(columns, cfg.label_column, cfg.data)
    rows, held_out = split_validation(rows, cfg.validation_fraction, cfg.seed)
    row_labels = [str(r.get(column)) for r in rows]
    split = dirichlet_partition(row_labels, cfg.clients, cfg.dirichlet_alpha, cfg.seed, min_per_client=cfg.training.batch_size)
    suffix = ".jsonl" if Path(cfg.data).suffix.lower() == ".jsonl" else ".csv"
    (cfg.out / "data").mkdir(parents=True, exist_ok=True)
    (cfg.out / "fleet").mkdir(parents=True, exist_ok=True)
    parts, profiles = [], []
    for k, (idx, doc) in enumerate(zip(split, simulated_fleet(cfg.clients, cfg.seed))):
        parts.append(cfg.out / "data" / f"client_{k:03d}{suffix}")
        write_rows(parts[-1], columns, [rows[i] for i in idx])
        profiles.append(cfg.out / "fleet" / f"{k:02d}-{doc['identity']['catalog_id']}.json")
        profiles[-1].write_text(json.dumps(doc, indent=2) + "\n")
    (cfg.out / "data" / "partition.json").write_text(json.dumps(summarize(split, row_labels), indent=2) + "\n")
    columns_kw = {"text_column": cfg.text_column, "label_column": cfg.label_column}
    write_rows(cfg.out / "data" / f"pooled{suffix}", columns, rows)
    pooled = load_examples(cfg.out / "data" / f"pooled{suffix}", "classification", labels, **columns_kw)
    test_file = cfg.test
    if held_out:
        test_file = cfg.out / "data" / f"validation{suffix}"
        write_rows(test_file, columns, held_out)
    test = load_examples(test_file, "classification", labels, **columns_kw)
    if eval_rows and eval_rows < len(test):
        test = test.subset(np.sort(np.random.default_rng(cfg.seed).permutation(len(test))[:eval_rows]))
    evaluator = Evaluator(cfg.model_dir, "classification", labels)
    log.info("%d clients, %d training rows split non-IID (alpha %.2f), %d %s rows", cfg.clients, len(rows),
             cfg.dirichlet_alpha, len(test), "validation (held out of the training data)" if held_out else "test")
    return Fleet(labels, parts, profiles, pooled, test,
                 lambda adapter: evaluator.evaluate(adapter, test, seq_len=cfg.training.seq_len, batch_size=256))


def split_validation(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training rows, held-out validation rows): a seeded random `fraction` of the rows is held out."""
    if fraction <= 0:
        return rows, []
    if fraction >= 1:
        raise UserError(f"the validation fraction must be below 1, got {fraction}")
    order = np.random.default_rng([seed, 7]).permutation(len(rows))
    cut = int(round(fraction * len(rows)))
    return [rows[i] for i in np.sort(order[cut:])], [rows[i] for i in np.sort(order[:cut])]


def methods_for(aggregator: str, compare: bool, ranks: tuple[int, ...]) -> list[Method]:
    if not compare:
        return [Method(aggregator, aggregator, ranks)]
    lo, hi = min(ranks), max(ranks)
    return [Method(f"fedavg-r{lo}", "fedavg", (lo,)), Method(f"fedavg-r{hi}", "fedavg", (hi,)),
            Method("hetlora", "hetlora", ranks), Method("hlora", "hlora", ranks), Method("plora", "plora", ranks)]


def serve_args(cfg: DemoConfig, method: Method) -> list[str]:
    return ["--model", cfg.model_dir, "--task", "classification", "--labels", cfg.labels,
            "--aggregator", method.aggregator, "--ranks", ",".join(map(str, method.ranks)),
            "--rounds", str(cfg.rounds), "--clients-per-round", str(cfg.clients_per_round),
            "--min-clients", str(min(cfg.clients_per_round, cfg.clients)),
            "--round-deadline", str(cfg.round_deadline), "--seed", str(cfg.seed),
            *training_args(cfg.training, prune=method.aggregator == "hetlora"),
            "--head-init", cfg.head_init, "--head-clients", str(cfg.clients), "--head-rounds", str(cfg.head_rounds),
            "--lr-decay", cfg.lr_decay, "--server-opt", cfg.server_opt, "--server-lr", str(cfg.server_lr),
            "--poll-seconds", "0.2", "--robust", cfg.robust, *method.options]


def training_args(training: TrainingSettings, *, prune: bool) -> list[str]:
    """`hetlora serve` options that send these training settings (self-pruning only when `prune`)."""
    head_lr = ["--head-lr", str(training.head_lr)] if training.head_lr is not None else []
    return ["--local-steps", str(training.steps), "--batch-size", str(training.batch_size),
            "--seq-len", str(training.seq_len), "--lr", str(training.lr), *head_lr, "--schedule", training.schedule,
            "--head-epochs", str(training.head_epochs), "--head-fit-lr", str(training.head_fit_lr),
            "--warmup-steps", str(training.warmup_steps), "--lora-alpha", str(training.lora_alpha),
            "--prune-gamma", str(training.prune_gamma), "--min-rank", str(training.min_rank),
            "--prune-lambda", str(training.prune_lambda if prune else 0.0)]


def federated_run(cfg: DemoConfig, method: Method, parts: list[Path], profiles: list[Path], evaluate,
                  on_row) -> list[RoundRow]:
    """Run one method end to end with real processes; evaluate each global version as it lands."""
    run_dir = cfg.out / method.label
    server, url = start_server(serve_args(cfg, method), run_dir / "server")
    clients = []
    try:
        clients = [start_client(url, part, run_dir / "clients" / f"client_{i:03d}",
                                ["--model", cfg.model_dir, "--profile-file", str(profile), "--name", profile.stem,
                                 "--poll", "0.2", "--text-column", cfg.text_column]
                                + (["--label-column", cfg.label_column] if cfg.label_column else [])
                                + (["--testing-scale-update", str(cfg.attack_scale)] if i < cfg.adversarial else []))
                   for i, (part, profile) in enumerate(zip(parts, profiles))]
        api = ServerAPI(url, give_up_after=60)
        rows, seen, fleet_shown, phase = [], 0, False, []
        while True:
            status = api.status()
            if not fleet_shown and len(status["clients"]) == len(clients):
                log.info("%s fleet: %s", method.label,
                         ", ".join(f"{c['name']} r={c['rank']}" for c in status["clients"]))
                fleet_shown = True
            for entry in status["history"][seen:]:
                seen += 1
                phase.append(entry)
                if entry["stage"] == "head-fit" and entry["round"] < cfg.head_rounds:
                    continue  # the head rounds make one row, at their last
                rows.append(_row(method.label, phase, api, evaluate))
                on_row(rows[-1])
                phase = []
            if status["finished"] and seen >= len(status["history"]):
                break
            dead = [c for c in clients if not c.alive() and c.wait() != 0]
            if dead:
                raise UserError(f"a client failed ({dead[0].log_path}):\n{dead[0].tail()}")
            if not server.alive():
                raise UserError(f"the server exited ({server.log_path}):\n{server.tail()}")
            time.sleep(0.5)
        for c in clients:
            c.wait(timeout=120)
        save_global(api.global_adapter(), run_dir, cfg.model_dir, status["run"]["labels"])
        return rows
    finally:
        for c in clients:
            c.stop()
        server.stop()


def save_global(data: bytes, run_dir: Path, model_dir: str, labels: list[str]) -> None:
    """The final global adapter in the wire format and as a PEFT folder (edge_client.peft_export)."""
    from edge_client.peft_export import export_peft
    from hetlora.protocol.atomic import write_bytes

    write_bytes(run_dir / "global.safetensors", data)
    export_peft(decode(data), run_dir / "peft", model_dir=model_dir, task="classification", labels=labels)
    log.info("final global adapter: %s (wire) and %s (PEFT)", run_dir / "global.safetensors", run_dir / "peft")


def _row(label: str, entries: list[dict], api: ServerAPI, evaluate) -> RoundRow:
    """A table row for aggregated rounds `entries` (one round, or the head rounds), evaluated at the last;
    bytes summed, seconds = the server's time from the first opening to the last aggregation."""
    entry = entries[-1]
    data = api.global_adapter(version=entry["round"])
    metrics = evaluate(decode(data))
    ranks = list(entry["effective_ranks"].values()) or [0]
    return RoundRow(method=label, round=entry["round"], accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"],
                    mean_rank=sum(ranks) / len(ranks), bytes_up=sum(e["bytes_up"] for e in entries),
                    bytes_down=sum(e["bytes_down"] for e in entries), seconds=entry["aggregated_at"] - entries[0]["opened_at"],
                    stage=entry["stage"])


def format_table(rows: list[RoundRow]) -> str:
    header = f"{'method':<12} {'round':>5} {'stage':<15} {'accuracy':>8} {'macro-F1':>8} {'mean rank':>9} " \
             f"{'MB up':>7} {'MB down':>7} {'seconds':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.method:<12} {r.round:>5} {r.stage:<15} {r.accuracy:>8.3f} {r.macro_f1:>8.3f} {r.mean_rank:>9.1f} "
                     f"{r.bytes_up / 1e6:>7.2f} {r.bytes_down / 1e6:>7.2f} {r.seconds:>7.1f}")
    return "\n".join(lines)


def rows_json(rows: list[RoundRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def centralized_run(cfg: DemoConfig, labels: list[str], pooled, evaluate, on_row) -> list[RoundRow]:
    """LoRA at the largest rank on the pooled data, in process, with the federated runs' settings: the
    same initial global (the server's `initial_global`, its head from the pooled data's statistics), the
    head fitted on the pooled frozen features for as many epochs as the head rounds make (head_rounds x
    head_epochs), the same learning rates, schedule and decay across rounds; per LoRA "round" as many steps
    as the selected fleet takes in one federated round (clients_per_round x steps)."""
    from edge_client.models import derive_spec
    from edge_client.training import TorchTrainer
    from server_stub.aggregation import make_rule
    from server_stub.head_round import initial_global

    rank = max(cfg.ranks)
    trainer = TorchTrainer(cfg.model_dir, "classification", labels=labels)
    rule = make_rule("fedavg")
    steps = replace(cfg.training, steps=cfg.clients_per_round * cfg.training.steps, prune_lambda=0.0)
    rows, t0 = [], time.monotonic()

    def emit(number: int, stage: str, adapter) -> None:
        metrics = evaluate(adapter)
        rows.append(RoundRow("centralized", number, metrics["accuracy"], metrics["macro_f1"], rank, 0, 0,
                             time.monotonic() - t0, stage))
        on_row(rows[-1])

    if cfg.head_init != "none":
        features, targets = trainer.frozen_features(pooled, cfg.training.seq_len)
        stats = class_statistics(features, targets, len(labels))
        spec = derive_spec(cfg.model_dir, "classification", num_labels=len(labels))
        adapter, _ = initial_global(rule, spec, [stats], head_init=cfg.head_init, global_rank=rank, seed=cfg.seed)
        emit(0, "head-statistics", adapter)
        if cfg.head_rounds:
            t0 = time.monotonic()
            adapter = fitted_head(adapter, spec, features, targets, stats.class_counts, cfg)
            emit(cfg.head_rounds, "head-fit", adapter)
    else:
        adapter = rule.init_global(derive_spec(cfg.model_dir, "classification", num_labels=len(labels)), rank, cfg.seed)
    first = cfg.head_rounds + 1 if cfg.head_init != "none" else 1
    for number in range(first, first + cfg.rounds):
        t0 = time.monotonic()
        settings = replace(steps, seed=cfg.seed + number).decayed(cfg.lr_decay, number - first, cfg.rounds)
        adapter = trainer.train_round(adapter, pooled, settings, rank=rank).adapter
        emit(number, "lora", adapter)
    return rows


def fitted_head(adapter, spec, features, targets, class_counts, cfg: DemoConfig):
    """`adapter` with its head fitted on the pooled frozen features for head_rounds x head_epochs epochs."""
    from edge_client.head_fit import fit_head, logit_adjustment
    from hetlora.protocol.spec import linear_head

    weight_name, bias_name, _, _ = linear_head(spec)
    training = cfg.training
    fit = fit_head(adapter.dense[weight_name], adapter.dense[bias_name], features, targets,
                   logit_adjustment(targets, len(class_counts), class_counts),
                   epochs=cfg.head_rounds * training.head_epochs, lr=training.head_fit_lr,
                   batch_size=training.batch_size, seed=cfg.seed)
    return replace(adapter, dense=adapter.dense | {weight_name: fit.weight, bias_name: fit.bias})


def plot_rows(rows: list[RoundRow], path: Path) -> Path | None:
    """Accuracy and macro-F1 against the round, one line per method."""
    from hetlora.plots import line_plot

    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        xs, cols = series.setdefault(r.method, ([], [[], []]))
        xs.append(r.round)
        cols[0].append(r.accuracy)
        cols[1].append(r.macro_f1)
    return line_plot(path, series, panels=[("test accuracy", 0), ("test macro-F1", 1)], xlabel="round",
                     title="Federated LoRA on heterogeneous devices")
