"""The main job: a heterogeneous fleet federates LoRA on real data, on this machine.

For each method a real `hetlora serve` and N real `hetlora client` processes run on loopback;
the clients present device profiles from the catalog (so their ranks come from the tier
policy), train on their own data (simulation.fleets: a non-IID label split for classification,
one person's chats per device for chat), and the demo evaluates every global version as it
appears. `compare` adds the FedAvg baselines at the smallest and largest rank and centralized LoRA
on the pooled data with the same number of examples (simulation.centralized).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from simulation.energy import client_tiers, tier_energy
from simulation.fleet import start_client, start_server
from edge_client.server_api import ServerAPI
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import decode
from hetlora.errors import UserError
from hetlora.plots import line_plot

log = logging.getLogger("hetlora.demo")
# The demo's local training: short cosine rounds with a warm-up; after the head rounds the LoRA factors learn at
# half the head's rate (lr 1e-3 was best of 1e-3 and 2e-3 on the validation split, head_lr 0 and 2e-3 tied).
DEMO_TRAINING = TrainingSettings(steps=20, batch_size=16, seq_len=32, lr=1e-3, head_lr=2e-3, schedule="cosine",
                                 warmup_steps=2, prune_lambda=0.01)


# The chat demo: SmolLM2-135M-Instruct on one person's replies per device (chosen on the validation split,
# RESULTS.md "Chat"). No head: round 0 is the base model (zero-shot), then LoRA rounds.
CHAT_TRAINING = TrainingSettings(steps=10, batch_size=8, seq_len=96, lr=2e-3, schedule="cosine", warmup_steps=1,
                                 prune_lambda=0.01)
TASKS = ("classification", "chat")


@dataclass(frozen=True)
class DemoConfig:
    model_dir: str
    data: str | None  # chat: None = the bundled chats
    test: str | None  # chat: None = the split's own test sets
    labels: str | None  # classification only
    out: Path
    task: str = "classification"  # classification | chat
    min_replies: int = 100  # chat: replies a person needs to become a device
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
    validation_fraction: float = 0.0  # > 0: evaluate on validation data instead of the test set (simulation.fleets)
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
    """One evaluated global version. Classification rows carry accuracy and macro-F1, chat rows perplexity
    (people outside the fleet) and personal_perplexity (held-out conversations of the fleet's people).
    energy_j: the fleet's estimated training joules up to this row (simulation.energy; None: not a fleet run);
    tier_energy: this row's rounds per device tier (`simulation.energy.tier_energy`)."""

    method: str
    round: int
    mean_rank: float
    bytes_up: int
    bytes_down: int
    seconds: float
    stage: str = "lora"  # start (round 0 without a head) | head-statistics | head-fit (the head rounds) | lora
    accuracy: float | None = None
    macro_f1: float | None = None
    perplexity: float | None = None
    personal_perplexity: float | None = None
    energy_j: float | None = None
    tier_energy: dict | None = None


def model_task(task: str) -> str:
    """The model's task behind a demo task: chat data trains a causal LM."""
    return "causal-lm" if task == "chat" else task


def methods_for(aggregator: str, compare: bool, ranks: tuple[int, ...]) -> list[Method]:
    if not compare:
        return [Method(aggregator, aggregator, ranks)]
    lo, hi = min(ranks), max(ranks)
    return [Method(f"fedavg-r{lo}", "fedavg", (lo,)), Method(f"fedavg-r{hi}", "fedavg", (hi,)),
            Method("hetlora", "hetlora", ranks), Method("hlora", "hlora", ranks), Method("plora", "plora", ranks)]


def serve_args(cfg: DemoConfig, method: Method, devices: int) -> list[str]:
    """`hetlora serve` options of one method's run over a fleet of `devices` clients."""
    labels = ["--labels", cfg.labels] if cfg.labels else []
    return ["--model", cfg.model_dir, "--task", model_task(cfg.task), *labels, "--aggregator", method.aggregator,
            "--ranks", ",".join(map(str, method.ranks)),
            "--rounds", str(cfg.rounds), "--clients-per-round", str(cfg.clients_per_round),
            "--min-clients", str(min(cfg.clients_per_round, devices)),
            "--start-clients", str(devices),  # round 1 opens once the whole fleet is in: the seed's selection
            "--round-deadline", str(cfg.round_deadline), "--seed", str(cfg.seed),
            *training_args(cfg.training, prune=method.aggregator == "hetlora"),
            "--head-init", cfg.head_init, "--head-rounds", str(cfg.head_rounds),
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


def federated_run(cfg: DemoConfig, method: Method, fleet, on_row) -> list[RoundRow]:
    """Run one method end to end with real processes; evaluate each global version as it lands (round 0 too,
    when there is no head round 0: the starting global, for a chat model the base model itself), on one thread
    while the fleet trains and on every core once it has finished."""
    import torch

    run_dir = cfg.out / method.label
    torch.set_num_threads(1)  # the evaluations run beside the fleet's processes, one thread each
    server, url = start_server(serve_args(cfg, method, len(fleet.parts)), run_dir / "server")
    clients = []
    try:
        clients = start_clients(cfg, fleet, url, run_dir)
        api = ServerAPI(url, give_up_after=60)
        evaluate = fleet.evaluate
        rows, seen, fleet_shown, phase = [], 0, False, []
        if cfg.head_init == "none":
            rows.append(_start_row(method.label, api, evaluate))
            on_row(rows[-1])
        while True:
            status = api.status()
            if status["finished"]:  # the fleet is done: the evaluations still queued get every core
                torch.set_num_threads(os.cpu_count() or 1)
            if not fleet_shown and len(status["clients"]) == len(clients):
                log.info("%s fleet: %s", method.label,
                         ", ".join(f"{c['name']} r={c['rank']}" for c in status["clients"]))
                fleet_shown = True
            for entry in status["history"][seen:]:
                seen += 1
                phase.append(entry)
                if entry["stage"] == "head-fit" and entry["round"] < cfg.head_rounds:
                    continue  # the head rounds make one row, at their last
                spent = rows[-1].energy_j if rows else 0.0
                rows.append(_row(method.label, phase, api, evaluate, client_tiers(status, fleet.tiers), spent))
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
        save_global(api.global_adapter(), run_dir, cfg.model_dir, model_task(cfg.task), status["run"]["labels"])
        return rows
    finally:
        for c in clients:
            c.stop()
        server.stop()


def start_clients(cfg: DemoConfig, fleet, url: str, run_dir: Path) -> list:
    """One `hetlora client` per device of the fleet: its data file and catalog profile (the attackers first)."""
    return [start_client(url, part, run_dir / "clients" / f"client_{i:03d}",
                         ["--model", cfg.model_dir, "--profile-file", str(profile), "--name", profile.stem,
                          "--poll-seconds", "0.2", "--text-column", cfg.text_column]
                         + (["--label-column", cfg.label_column] if cfg.label_column else [])
                         + (["--testing-scale-update", str(cfg.attack_scale)] if i < cfg.adversarial else []))
            for i, (part, profile) in enumerate(zip(fleet.parts, fleet.profiles))]


def save_global(data: bytes, run_dir: Path, model_dir: str, task: str, labels: list[str] | None) -> None:
    """The final global adapter in the wire format and as a PEFT folder (hetlora.models.peft_folder)."""
    # the model stack, only when the run's result is written
    from hetlora.models.peft_folder import save_result

    wire, peft = save_result(data, run_dir, model_dir=model_dir, task=task, labels=labels)
    log.info("final global adapter: %s (wire) and %s (PEFT)", wire, peft)


def _start_row(label: str, api: ServerAPI, evaluate) -> RoundRow:
    """Round 0 of a run without a head round: global version 0 as the server made it, before any training."""
    return RoundRow(label, 0, 0.0, 0, 0, 0.0, "start", **evaluate(decode(api.global_adapter(version=0))),
                    energy_j=0.0, tier_energy={})


def _row(label: str, entries: list[dict], api: ServerAPI, evaluate, tier_of: dict[str, int],
         spent: float) -> RoundRow:
    """A table row for aggregated rounds `entries` (one round, or the head rounds), evaluated at the last;
    bytes summed, seconds = the server's time from the first opening to the last aggregation; energy_j = `spent`
    (the rows before) + these rounds' estimated joules, per tier by `tier_of` (client id -> tier rank)."""
    entry = entries[-1]
    data = api.global_adapter(version=entry["round"])
    ranks = list(entry["effective_ranks"].values()) or [0]
    tiers = tier_energy(entries, tier_of)
    return RoundRow(label, entry["round"], sum(ranks) / len(ranks), sum(e["bytes_up"] for e in entries),
                    sum(e["bytes_down"] for e in entries), entry["aggregated_at"] - entries[0]["opened_at"],
                    entry["stage"], **evaluate(decode(data)), energy_j=spent + sum(t["joules"] for t in tiers.values()),
                    tier_energy=tiers)


METRICS = {"classification": (("accuracy", "accuracy", "8.3f"), ("macro_f1", "macro-F1", "8.3f")),
           "chat": (("perplexity", "perplexity", "10.2f"), ("personal_perplexity", "personal ppl", "12.2f"))}


def format_table(rows: list[RoundRow], task: str = "classification") -> str:
    metrics = [(key, title, fmt) for key, title, fmt in METRICS[task] if any(getattr(r, key) is not None for r in rows)]
    width = lambda fmt: int(fmt.rstrip("f").split(".")[0])  # noqa: E731
    header = f"{'method':<12} {'round':>5} {'stage':<15} " + " ".join(f"{t:>{width(f)}}" for _, t, f in metrics) + \
             f" {'mean rank':>9} {'MB up':>7} {'MB down':>7} {'seconds':>7} {'fleet J est.':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        values = " ".join(format(getattr(r, k), f) if getattr(r, k) is not None else f"{'-':>{width(f)}}"
                          for k, _, f in metrics)
        lines.append(f"{r.method:<12} {r.round:>5} {r.stage:<15} {values} {r.mean_rank:>9.1f} "
                     f"{r.bytes_up / 1e6:>7.2f} {r.bytes_down / 1e6:>7.2f} {r.seconds:>7.1f} "
                     + (f"{r.energy_j:>12.1f}" if r.energy_j is not None else f"{'-':>12}"))
    return "\n".join(lines)


def rows_json(rows: list[RoundRow]) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if v is not None} for r in rows]


def plot_rows(rows: list[RoundRow], path: Path, task: str = "classification") -> Path | None:
    """The task's metrics against the round, one line per method."""
    metrics = [(key, title) for key, title, _ in METRICS[task] if any(getattr(r, key) is not None for r in rows)]
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        xs, cols = series.setdefault(r.method, ([], [[] for _ in metrics]))
        xs.append(r.round)
        for col, (key, _) in zip(cols, metrics):
            col.append(getattr(r, key) if getattr(r, key) is not None else float("nan"))
    what = "test" if task == "classification" else "held-out"
    return line_plot(path, series, panels=[(f"{what} {title}", i) for i, (_, title) in enumerate(metrics)],
                     xlabel="round", title="Federated LoRA on heterogeneous devices")
