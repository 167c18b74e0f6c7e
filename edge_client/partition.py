"""Split a dataset across N clients: non-IID by label (Dirichlet) or IID, seeded.

Dirichlet(alpha): for every class c, draw p ~ Dir(alpha * 1_N) and deal c's shuffled rows to the
clients in proportions p. Small alpha gives each client few classes; large alpha approaches the
global label mix. Afterwards clients below `min_per_client` take random rows from the currently
largest client until they reach it. Causal-LM data has no labels: rows are split IID.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from hetlora.errors import UserError


def _check_sizes(n_rows: int, n_clients: int, min_per_client: int) -> None:
    if n_clients < 1:
        raise UserError(f"--clients must be at least 1, got {n_clients}")
    if min_per_client < 0:
        raise UserError(f"--min-per-client must be >= 0, got {min_per_client}")
    if n_clients * min_per_client > n_rows:
        raise UserError(f"{n_clients} clients x {min_per_client} rows each needs {n_clients * min_per_client} rows, "
                        f"the data has {n_rows}; lower --clients or --min-per-client")


def dirichlet_partition(labels, n_clients: int, alpha: float, seed: int, min_per_client: int = 1) -> list[np.ndarray]:
    """Row indices per client (each list shuffled), Dirichlet(alpha) over labels per class."""
    labels = np.asarray(labels)
    _check_sizes(len(labels), n_clients, min_per_client)
    if not alpha > 0:
        raise UserError(f"--alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(n_clients)]
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, alpha)))[:-1] * len(rows)).astype(int)
        for shard, part in zip(shards, np.split(rows, cuts)):
            shard.extend(part.tolist())
    _top_up(shards, min_per_client, rng)
    return [rng.permutation(np.asarray(s, dtype=np.int64)) for s in shards]


def _top_up(shards: list[list[int]], minimum: int, rng: np.random.Generator) -> None:
    """Move random rows from the largest shard to each shard below `minimum`."""
    for shard in shards:
        while len(shard) < minimum:
            donor = max(shards, key=len)
            shard.append(donor.pop(int(rng.integers(len(donor)))))


def iid_partition(n_rows: int, n_clients: int, seed: int, min_per_client: int = 1) -> list[np.ndarray]:
    """A seeded permutation of the rows cut into N near-equal parts."""
    _check_sizes(n_rows, n_clients, min_per_client)
    return np.array_split(np.random.default_rng(seed).permutation(n_rows), n_clients)


def entropy_bits(counts) -> float:
    """Shannon entropy H = -sum p log2 p of a count vector (0 for an empty one)."""
    counts = np.asarray(counts, dtype=float)
    if counts.sum() == 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def summarize(parts: list[np.ndarray], labels=None) -> list[dict]:
    """Per client: row count and, with labels, label counts and label entropy in bits."""
    out = []
    for k, rows in enumerate(parts):
        entry = {"client": k, "n": int(len(rows))}
        if labels is not None:
            values, counts = np.unique(np.asarray(labels)[rows], return_counts=True)
            entry["label_counts"] = {str(v): int(c) for v, c in zip(values, counts)}
            entry["labels"] = int(len(values))
            entry["entropy_bits"] = entropy_bits(counts)
        out.append(entry)
    return out


def write_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Rows in the input's format: JSONL for a .jsonl path, else CSV with `columns`."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        return
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
