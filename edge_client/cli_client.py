"""Run the edge client: register with the server, then train and upload every round it is selected for.

Restart it with the same --state-dir after a crash or reboot: it keeps its identity and never
uploads twice for a round. Network errors and server 5xx answers are retried with backoff.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_client.backends import BACKENDS
from hetlora.argtypes import add_renamed, watts
from hetlora.config_file import add_config_option
from hetlora.errors import UserError
from hetlora.secret_file import read_secret
from profiles.catalog import profile_for
from edge_client.device.profile import collect_profile, validate_profile
from hetlora.output import show_progress



def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_option(p)
    p.add_argument("--server", required=True, help="server URL, e.g. http://192.168.1.20:8080")
    p.add_argument("--data", required=True, help="local training data (CSV or JSONL)")
    p.add_argument("--state-dir", required=True, help="folder for identity, progress and pending uploads")
    p.add_argument("--model", help="local base model folder (default: the bundled model of the run's task)")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="training backend (default: torch)")
    p.add_argument("--artifacts", help="exported artifacts folder (for --backend onnx/executorch/auto)")
    p.add_argument("--rank", type=int, help="rank to ask for (default: the largest the server offers; "
                                            "the server's tier policy may assign less)")
    p.add_argument("--name", help="a human-readable name shown in the server status")
    p.add_argument("--ca-file", metavar="PEM", help="CA certificate(s) to verify an https:// server "
                                                   "(default: the CA bundle of requests)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--enroll-secret-file", metavar="FILE",
                        help="the server's enrollment secret, read from FILE (when the server requires one)")
    secret.add_argument("--enroll-secret", metavar="SECRET",
                        help="the server's enrollment secret (visible in the process list: prefer the file)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--profile-as", metavar="CATALOG_ID",
                     help="present a catalog device profile instead of profiling this machine (simulations)")
    who.add_argument("--profile-file", metavar="FILE",
                     help="present this profile JSON (from `hetlora profile --json`) instead of profiling")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", help="label column (default: 'label', or 'category')")
    p.add_argument("--max-rounds", type=int, help="stop after this many local rounds; a later run resumes")
    add_renamed(p, "--poll-seconds", "--poll", type=float, metavar="SECONDS", help="seconds between round polls (default: the server's "
                                                                 "hint)")
    p.add_argument("--give-up-after", type=float, help="give up after this many seconds of failed retries "
                                                       "(default: retry forever)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--watts", type=watts, help="this device's power while it trains, for the training-energy "
                                               "estimate sent with each update (joules = watts x training seconds; "
                                               "default: the catalog's figure for the profile's device, else unknown)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # TEST TOOL, hidden: a model-replacement attacker for robustness measurements (benchmarks, docs/RESULTS.md).
    p.add_argument("--testing-scale-update", type=float, help=argparse.SUPPRESS)
    g = p.add_argument_group("local training overrides (default: the server's hints)")
    add_renamed(g, "--local-steps", "--steps", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="torch backend: recompute each layer in backward instead of keeping its activations (less "
                        "memory, about 40%% more step time); the server's tier policy turns it on when a tier needs it")


def profile_source(catalog_id: str | None, profile_file: str | None):
    """A callable returning the profile the client reports: a catalog device's, a file's, or this machine's."""
    if catalog_id:
        doc = profile_for(catalog_id)
        return lambda: doc
    if profile_file:
        doc = read_profile_file(profile_file)
        return lambda: doc

    return lambda: collect_profile(quick=True)


def read_profile_file(path: str) -> dict:
    """A profile document from a JSON file, checked against the profile schema."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the profile {path}: {exc}") from None
    problems = validate_profile(doc)
    if problems:
        raise UserError(f"{path} is not a device profile: {problems[0]}")
    return doc


def run(args: argparse.Namespace) -> int:
    # torch and transformers load when the command runs: its --help and argument errors stay instant
    from edge_client.client import ClientOptions, EdgeClient

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in {"steps": args.local_steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                   "lr": args.lr, "activation_checkpointing": args.activation_checkpointing}.items()
                 if v is not None}
    if args.enroll_secret_file:
        args.enroll_secret = read_secret(args.enroll_secret_file)
    options = ClientOptions(
        server=args.server, data=args.data, state_dir=args.state_dir, model_dir=args.model, backend=args.backend,
        artifacts_dir=args.artifacts, requested_rank=args.rank, name=args.name, text_column=args.text_column,
        label_column=args.label_column, max_rounds=args.max_rounds, poll_seconds=args.poll_seconds,
        progress=not args.no_progress and show_progress(), train_overrides=overrides, give_up_after=args.give_up_after,
        enroll_secret=args.enroll_secret, ca_file=args.ca_file,
        testing_scale_update=args.testing_scale_update, watts=args.watts,
    )
    return EdgeClient(options, profile_source(args.profile_as, args.profile_file)).run()
