"""The data side of a simulated fleet: per-device data files, catalog device profiles, the pooled data of the
centralized baseline, and the evaluation every global version gets.

classification: a Dirichlet(alpha) label split of the training rows; accuracy and macro-F1 on the test rows.
chat: one device per person (edge_client.chat_split), or an IID split of rows without `user`; perplexity on
the replies of people outside the fleet (`perplexity`) and on held-out conversations of the fleet's own people
(`personal_perplexity`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetlora.errors import UserError
from edge_client.data import label_column_of, load_examples, read_rows
from edge_client.evaluate import Evaluator
from edge_client.partition import dirichlet_partition, iid_partition, summarize, write_rows
from hetlora.labels import read_labels
from edge_client.chat_split import split_by_user
from hetlora.chitchat import chitchat_rows
from profiles.catalog import simulated_fleet
from hetlora.models.adapter_spec import derive_spec
from profiles.memory_model import ModelShape
from profiles.policy import decide_tier

log = logging.getLogger("hetlora.demo")


@dataclass
class Fleet:
    """What the runs share: labels (classification), per-client data files and device profiles, the pooled
    training examples (centralized baseline) and `evaluate(adapter) -> {metric: value}` on the held-out data
    (the RoundRow metrics of the task: accuracy and macro_f1, or perplexity and personal_perplexity)."""

    labels: list[str] | None
    parts: list[Path]
    profiles: list[Path]
    pooled: object
    evaluate: Callable[[object], dict]
    tiers: dict = field(default_factory=dict)  # device -> its TierDecision under the task's packaged policy
    test: object = None  # classification: the test (or validation) examples

    def __post_init__(self):
        """Keep the devices the run's tier policy lets train (the server would refuse the others)."""
        keep = [k for k, path in enumerate(self.profiles) if path.stem not in self.excluded]
        self.parts, self.profiles = [self.parts[k] for k in keep], [self.profiles[k] for k in keep]

    @property
    def excluded(self) -> dict[str, str]:
        """Devices the tier policy rules out of training, with its last reason."""
        return {name: d.reasons[-1] for name, d in self.tiers.items() if d.rank == 0}

    def mean_batch(self, batch_size: int) -> float:
        """The batch a device of the fleet trains with on average: `batch_size` within its tier's cap."""
        caps = [min(batch_size, d.batch_size) for d in self.tiers.values() if d.rank > 0]
        return sum(caps) / len(caps) if caps else float(batch_size)


def prepare_fleet(cfg, eval_rows: int | None = None) -> Fleet:
    """The fleet for cfg.task (module docstring); files go to cfg.out/data and cfg.out/fleet."""
    return (prepare_chat_fleet if cfg.task == "chat" else prepare_classification_fleet)(cfg, eval_rows)


def prepare_classification_fleet(cfg, eval_rows: int | None = None) -> Fleet:
    labels = list(read_labels(cfg.labels))
    columns, rows = read_rows(cfg.data)
    column = label_column_of(columns, cfg.label_column, cfg.data)
    rows, held_out = split_validation(rows, cfg.validation_fraction, cfg.seed)
    row_labels = [str(r.get(column)) for r in rows]
    split = dirichlet_partition(row_labels, cfg.clients, cfg.dirichlet_alpha, cfg.seed,
                                min_per_client=cfg.training.batch_size)
    suffix = _suffix(cfg.data)
    parts = _write_parts(cfg, columns, [[rows[i] for i in idx] for idx in split], suffix)
    (cfg.out / "data" / "partition.json").write_text(json.dumps(summarize(split, row_labels), indent=2) + "\n")
    columns_kw = {"text_column": cfg.text_column, "label_column": cfg.label_column}
    pooled = _pooled(cfg, columns, rows, suffix, "classification", labels, **columns_kw)
    test_file = cfg.test
    if held_out:
        test_file = cfg.out / "data" / f"validation{suffix}"
        write_rows(test_file, columns, held_out)
    test = _subset(load_examples(test_file, "classification", labels, **columns_kw), eval_rows, cfg.seed)
    evaluator = Evaluator(cfg.model_dir, "classification", labels)
    log.info("%d clients, %d training rows split non-IID (alpha %.2f), %d %s rows", cfg.clients, len(rows),
             cfg.dirichlet_alpha, len(test), "validation (held out of the training data)" if held_out else "test")
    profiles = _profiles(cfg)
    def evaluate(adapter) -> dict:
        metrics = evaluator.evaluate(adapter, test, seq_len=cfg.training.seq_len, batch_size=256)
        return {key: metrics[key] for key in ("accuracy", "macro_f1")}

    return Fleet(labels, parts, profiles, pooled, evaluate, _tiers(cfg, profiles, "classification", len(labels)), test)


def prepare_chat_fleet(cfg, eval_rows: int | None = None) -> Fleet:
    if cfg.data:
        columns, rows = read_rows(cfg.data)
    else:
        rows = chitchat_rows()
        columns = list(rows[0])
    (cfg.out / "data").mkdir(parents=True, exist_ok=True)
    personal = None
    if "user" in columns:
        chats = split_by_user(rows, cfg.clients, min_replies=cfg.min_replies, test_rows=eval_rows or 300,
                              seed=cfg.seed)
        client_rows, test_rows = chats.clients, chats.validation if cfg.validation_fraction > 0 else chats.unseen
        personal = None if cfg.validation_fraction > 0 else chats.personal
        how = f"one person per device ({', '.join(str(len(p)) for p in client_rows)} replies)"
    else:
        client_rows = [[rows[i] for i in idx] for idx in iid_partition(len(rows), cfg.clients, cfg.seed,
                                                                      cfg.training.batch_size)]
        test_rows, how = None, "IID (the rows have no 'user')"
    if cfg.test:
        test_rows = read_rows(cfg.test)[1]
    if not test_rows:
        raise UserError("chat rows without a 'user' column need a test file: pass --test FILE")
    parts = _write_parts(cfg, columns, client_rows, ".jsonl")
    pooled = _pooled(cfg, columns, [r for part in client_rows for r in part], ".jsonl", "causal-lm", None)
    sets = {"perplexity": test_rows} | ({"personal_perplexity": personal} if personal else {})
    examples = {}
    for key, chosen in sets.items():
        path = cfg.out / "data" / f"{key}.jsonl"
        write_rows(path, list(dict.fromkeys(k for r in chosen for k in r)), chosen)
        examples[key] = _subset(load_examples(path, "causal-lm"), eval_rows, cfg.seed)
    evaluator = Evaluator(cfg.model_dir, "causal-lm")
    log.info("%d devices, split %s; evaluation on %s", cfg.clients, how,
             ", ".join(f"{len(e)} rows ({k})" for k, e in examples.items()))

    def evaluate(adapter) -> dict:
        return {key: evaluator.evaluate(adapter, e, seq_len=cfg.training.seq_len, batch_size=8)["perplexity"]
                for key, e in examples.items()}

    profiles = _profiles(cfg)
    return Fleet(None, parts, profiles, pooled, evaluate, _tiers(cfg, profiles, "causal-lm"))


def split_validation(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training rows, held-out validation rows): a seeded random `fraction` of the rows is held out."""
    if fraction <= 0:
        return rows, []
    if fraction >= 1:
        raise UserError(f"the validation fraction must be below 1, got {fraction}")
    order = np.random.default_rng([seed, 7]).permutation(len(rows))
    cut = int(round(fraction * len(rows)))
    return [rows[i] for i in np.sort(order[cut:])], [rows[i] for i in np.sort(order[:cut])]


def _suffix(data) -> str:
    return ".jsonl" if Path(data).suffix.lower() == ".jsonl" else ".csv"


def _write_parts(cfg, columns: list[str], client_rows: list[list[dict]], suffix: str) -> list[Path]:
    (cfg.out / "data").mkdir(parents=True, exist_ok=True)
    parts = [cfg.out / "data" / f"client_{k:03d}{suffix}" for k in range(len(client_rows))]
    for path, rows in zip(parts, client_rows):
        write_rows(path, columns, rows)
    return parts


def _pooled(cfg, columns, rows, suffix: str, task: str, labels, **columns_kw):
    path = cfg.out / "data" / f"pooled{suffix}"
    write_rows(path, columns, rows)
    return load_examples(path, task, labels, **columns_kw)


def _profiles(cfg) -> list[Path]:
    """Catalog device profiles for the fleet, one file each (simulated_fleet: seeded)."""
    (cfg.out / "fleet").mkdir(parents=True, exist_ok=True)
    paths = []
    for k, doc in enumerate(simulated_fleet(cfg.clients, cfg.seed)):
        paths.append(cfg.out / "fleet" / f"{k:02d}-{doc['identity']['catalog_id']}.json")
        paths[-1].write_text(json.dumps(doc, indent=2) + "\n")
    return paths


def _tiers(cfg, profiles: list[Path], task: str, num_labels: int | None = None) -> dict:
    """Each device's tier under the task's packaged policy, as the server decides at registration (the same
    policy, model shape and local steps); those it rules out are logged with the reason."""
    spec = derive_spec(cfg.model_dir, task, num_labels=num_labels)
    shape = ModelShape.from_model_dir(cfg.model_dir)
    tiers = {path.stem: decide_tier(json.loads(path.read_text()), spec=spec, model=shape, steps=cfg.training.steps)
             for path in profiles}
    out = [name for name, d in tiers.items() if d.rank == 0]
    for name in out:
        log.info("%s cannot train this model: %s", name, tiers[name].reasons[-1])
    if len(profiles) - len(out) < max(cfg.clients_per_round, 1):
        raise UserError(f"only {len(profiles) - len(out)} of {len(profiles)} devices can train this model, fewer "
                        f"than --clients-per-round {cfg.clients_per_round}; add --clients or lower it")
    return tiers


def _subset(examples, n: int | None, seed: int):
    if n and n < len(examples):
        return examples.subset(np.sort(np.random.default_rng(seed).permutation(len(examples))[:n]))
    return examples
