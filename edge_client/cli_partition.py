"""Split a dataset across clients: Dirichlet(alpha) over labels (non-IID), or IID for causal-LM data.

Writes client_000.csv ... (same columns and format as the input) and partition.json (per-client
counts and label entropy) into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="CSV or JSONL file")
    parser.add_argument("--clients", type=int, required=True, help="number of clients N")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (small = skewed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--min-per-client", type=int, default=10, help="rows every client gets at least")
    parser.add_argument("--task", choices=("classification", "causal-lm"), default="classification",
                        help="causal-lm data has no labels and is split IID")
    parser.add_argument("--label-column", help="default: 'label', else 'category'")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from edge_client.data import label_column_of, read_rows
    from edge_client.partition import dirichlet_partition, iid_partition, summarize, write_rows

    columns, rows = read_rows(args.data)
    if args.task == "classification":
        column = label_column_of(columns, args.label_column, args.data)
        labels = [str(row.get(column)) for row in rows]
        parts = dirichlet_partition(labels, args.clients, args.alpha, args.seed, args.min_per_client)
    else:
        labels = None
        parts = iid_partition(len(rows), args.clients, args.seed, args.min_per_client)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl" if Path(args.data).suffix.lower() in (".jsonl", ".json", ".ndjson") else ".csv"
    clients = summarize(parts, labels)
    for entry, part in zip(clients, parts):
        entry["file"] = f"client_{entry['client']:03d}{suffix}"
        write_rows(out / entry["file"], columns, [rows[i] for i in part])
    summary = {"data": str(args.data), "mode": "dirichlet" if labels is not None else "iid",
               "alpha": args.alpha if labels is not None else None, "seed": args.seed, "clients": clients}
    (out / "partition.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['mode']} split of {len(rows)} rows into {len(parts)} clients -> {out}")
    print(f"{'client':>6} {'rows':>6} {'labels':>6} {'entropy':>8}")
    for entry in clients:
        print(f"{entry['client']:>6} {entry['n']:>6} {entry.get('labels', '-'):>6} "
              f"{entry.get('entropy_bits', float('nan')):>8.2f}")
    return 0
