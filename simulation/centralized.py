"""Centralized LoRA on the pooled data: the reference a federated rule is measured against.

It runs in this process with the federated runs' settings: the same initial global (the server's
`initial_global`; for classification its head from the pooled data's class statistics, then fitted on the
pooled frozen features for as many epochs as the head rounds make, head_rounds x head_epochs), the same
learning rates, schedule and decay across rounds, and per LoRA "round" as many examples as the selected
fleet sees in one federated round: clients_per_round x steps batches of the fleet's mean batch (each device's
batch is capped by its tier), in batches of the run's batch size.
"""

from __future__ import annotations

import time
from dataclasses import replace

from hetlora.protocol.head_stats import class_statistics
from hetlora.models.adapter_spec import derive_spec
from edge_client.training import TorchTrainer
from hetlora.engine.aggregation import make_rule
from hetlora.engine.head_round import initial_global
from simulation.demo import RoundRow, model_task
from edge_client.head_fit import fit_head, logit_adjustment
from hetlora.protocol.spec import linear_head


def centralized_run(cfg, fleet, on_row) -> list:
    """Rows of RoundRow for round 0 (and the head rounds' end) and every LoRA round, at the largest rank."""
    task = model_task(cfg.task)
    rank = max(cfg.ranks)
    labels = fleet.labels
    trainer = TorchTrainer(cfg.model_dir, task, labels=labels)
    spec = derive_spec(cfg.model_dir, task, num_labels=len(labels) if labels else None)
    rule = make_rule("fedavg")
    examples = cfg.clients_per_round * cfg.training.steps * fleet.mean_batch(cfg.training.batch_size)
    steps = replace(cfg.training, steps=max(1, round(examples / cfg.training.batch_size)), prune_lambda=0.0)
    rows, t0 = [], time.monotonic()

    def emit(number: int, stage: str, adapter) -> None:
        rows.append(RoundRow("centralized", number, rank, 0, 0, time.monotonic() - t0, stage,
                             **fleet.evaluate(adapter)))
        on_row(rows[-1])

    if cfg.head_init != "none":
        features, targets = trainer.frozen_features(fleet.pooled, cfg.training.seq_len)
        stats = class_statistics(features, targets, len(labels))
        adapter, _ = initial_global(rule, spec, [stats], head_init=cfg.head_init, global_rank=rank, seed=cfg.seed)
        emit(0, "head-statistics", adapter)
        if cfg.head_rounds:
            t0 = time.monotonic()
            adapter = fitted_head(adapter, spec, features, targets, stats.class_counts, cfg)
            emit(cfg.head_rounds, "head-fit", adapter)
    else:
        adapter = rule.init_global(spec, rank, cfg.seed)
        emit(0, "start", adapter)
    first = cfg.head_rounds + 1 if cfg.head_init != "none" else 1
    for number in range(first, first + cfg.rounds):
        t0 = time.monotonic()
        settings = replace(steps, seed=cfg.seed + number).decayed(cfg.lr_decay, number - first, cfg.rounds)
        adapter = trainer.train_round(adapter, fleet.pooled, settings, rank=rank).adapter
        emit(number, "lora", adapter)
    return rows


def fitted_head(adapter, spec, features, targets, class_counts, cfg):
    """`adapter` with its head fitted on the pooled frozen features for head_rounds x head_epochs epochs."""
    weight_name, bias_name, _, _ = linear_head(spec)
    training = cfg.training
    fit = fit_head(adapter.dense[weight_name], adapter.dense[bias_name], features, targets,
                   logit_adjustment(targets, len(class_counts), class_counts),
                   epochs=cfg.head_rounds * training.head_epochs, lr=training.head_fit_lr,
                   batch_size=training.batch_size, seed=cfg.seed)
    return replace(adapter, dense=adapter.dense | {weight_name: fit.weight, bias_name: fit.bias})
