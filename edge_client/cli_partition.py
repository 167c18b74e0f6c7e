"""Split a dataset across clients: Dirichlet(alpha) over labels (non-IID), by person for chat data, or IID.

--task classification: Dirichlet over the label column. --task chat: one device per person (the rows' `user`;
default data: the bundled Chit Chat corpus), plus test_unseen.jsonl (conversations without any training user:
generalisation), test_personal.jsonl (held-out conversations of the training users: personalisation) and
validation.jsonl (other conversations without training users, for tuning); chat rows without `user` are
split IID. --task causal-lm: IID.
Writes client_000.csv ... (the input's columns and format) and partition.json (per-client counts) into --out.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from edge_client.data import label_column_of, read_rows
from hetlora.errors import UserError
from hetlora.chitchat import chitchat_rows
from edge_client.chat_split import split_by_user
from edge_client.partition import dirichlet_partition, iid_partition, summarize, write_rows

log = logging.getLogger("hetlora.partition")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="CSV or JSONL file (required, except for --task chat: the bundled chats)")
    parser.add_argument("--clients", type=int, required=True, help="number of clients N")
    parser.add_argument("--task", choices=("classification", "chat", "causal-lm"), default="classification",
                        help="classification: Dirichlet over labels; chat: by user; causal-lm: IID")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (small = skewed)")
    parser.add_argument("--label-column", help="default: 'label', else 'category'")
    parser.add_argument("--min-per-client", type=int, default=10, help="rows every client gets at least "
                                                                       "(classification, causal-lm)")
    chat = parser.add_argument_group("chat (--task chat)")
    chat.add_argument("--users-per-client", type=int, default=1, help="people behind one device (default 1)")
    chat.add_argument("--min-replies", type=int, default=100,
                      help="a person needs at least this many replies (rows) to become a device (default 100)")
    chat.add_argument("--heldout-fraction", type=float, default=0.1,
                      help="share of each training user's replies held out, whole conversations (default 0.1)")
    chat.add_argument("--test-rows", type=int, default=300, help="rows in each chat test file (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    if args.data:
        columns, rows = read_rows(args.data)
    elif args.task == "chat":
        rows = chitchat_rows()
        columns = list(rows[0])
    else:
        raise UserError(f"--task {args.task} needs --data FILE")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl" if not args.data or Path(args.data).suffix.lower() in (".jsonl", ".json", ".ndjson") else ".csv"
    summary = split(args, columns, rows, out, suffix)
    (out / "partition.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['mode']} split of {len(rows)} rows into {len(summary['clients'])} clients -> {out}")
    labelled = summary["mode"] == "dirichlet"
    print(f"{'client':>6} {'rows':>6}  " + ("labels  entropy" if labelled else "users"))
    for entry in summary["clients"]:
        detail = (f"{entry['labels']:>6} {entry['entropy_bits']:>8.2f}" if labelled
                  else ", ".join(entry.get("users", [])))
        print(f"{entry['client']:>6} {entry['n']:>6}  {detail}")
    for name, n in summary.get("tests", {}).items():
        print(f"{name}: {n} rows")
    return 0


def split(args: argparse.Namespace, columns: list[str], rows: list[dict], out: Path, suffix: str) -> dict:
    """Write the client files (and chat test files) for the chosen mode; return the summary."""
    labels, parts, users, tests = None, None, None, {}
    if args.task == "classification":
        column = label_column_of(columns, args.label_column, args.data)
        labels = [str(row.get(column)) for row in rows]
        parts = dirichlet_partition(labels, args.clients, args.alpha, args.seed, args.min_per_client)
        mode = "dirichlet"
    elif args.task == "chat" and "user" in columns:
        chats = split_by_user(rows, args.clients, users_per_client=args.users_per_client,
                              min_replies=args.min_replies, heldout_fraction=args.heldout_fraction,
                              test_rows=args.test_rows, seed=args.seed)
        rows = [r for part in chats.clients for r in part]
        bounds = [0]
        for part in chats.clients:
            bounds.append(bounds[-1] + len(part))
        parts, users, mode = [range(a, b) for a, b in zip(bounds, bounds[1:])], chats.users, "by-user"
        for name, test in (("test_unseen.jsonl", chats.unseen), ("test_personal.jsonl", chats.personal),
                           ("validation.jsonl", chats.validation)):
            write_rows(out / name, columns, test)
            tests[name] = len(test)
    else:
        if args.task == "chat":
            log.warning("the chat rows have no 'user' column: splitting them IID")
        parts, mode = iid_partition(len(rows), args.clients, args.seed, args.min_per_client), "iid"
    clients = summarize(parts, labels)
    for k, (entry, part) in enumerate(zip(clients, parts)):
        entry["file"] = f"client_{entry['client']:03d}{suffix}"
        if users is not None:
            entry["users"] = users[k]
        write_rows(out / entry["file"], columns, [rows[i] for i in part])
    return {"data": str(args.data or "chitchat"), "mode": mode, "alpha": args.alpha if labels is not None else None,
            "seed": args.seed, "clients": clients, "tests": tests}
