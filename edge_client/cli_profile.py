"""Profile this device (identity, CPU, memory, battery, power sources, thermal, compute speed) and
optionally pick its LoRA rank tier.

By default prints a readable table; --json prints the versioned profile document.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from hetlora.argtypes import add_renamed
from hetlora.errors import UserError
from edge_client.device.profile import collect_profile, with_training_backend
from hetlora.models.bundled import default_model_dir
from hetlora.models.folders import check_model_dir
from profiles.memory_model import BACKENDS as TRAINING_BACKENDS

GB = 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the profile document as JSON")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="skip the compute measurements (a few seconds)")
    speed.add_argument("--full", action="store_true", help="measure compute for about a minute, long enough to throttle")
    parser.add_argument("--step", action="store_true",
                        help="also time one real LoRA training step at the lowest tier (loads the model)")
    parser.add_argument("--task", choices=("classification", "causal-lm"), default="classification",
                        help="the model the tier is for: its packaged tier policy, and the model --step trains")
    parser.add_argument("--model", metavar="DIR", help="model folder for --step (default: the task's bundled model)")
    parser.add_argument("--out", metavar="FILE", help="also write the profile document to FILE")
    parser.add_argument("--tier", action="store_true", help="print the LoRA rank tier for this device and why")
    add_renamed(parser, "--profile-as", "--as", metavar="CATALOG_ID",
                help="do not measure: take a catalog device's profile (implies --tier)")
    parser.add_argument("--policy", metavar="FILE", help="tier policy file (default: the task's packaged one)")
    parser.add_argument("--backend", choices=TRAINING_BACKENDS,
                        help="the backend this device will train with (the tier's memory prediction follows it; "
                             "recorded as compute.training_backend; default: torch)")
    parser.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a fake /sys + /proc tree


def run(args) -> int:
    if args.step and args.quick:
        raise UserError("--step measures compute; drop --quick")
    if args.model and not args.step:
        raise UserError("--model is the model for --step; add --step or drop --model")
    model_dir = _step_model(args.model, args.task) if args.step else None
    if args.profile_as:
        doc = _tier_module("catalog").profile_for(args.profile_as)
    else:
        if not Path(args.root).is_dir():
            raise UserError(f"--root {args.root} is not a directory")
        doc = collect_profile(args.root, quick=args.quick, full=args.full, step=args.step, model_dir=model_dir,
                              policy_file=args.policy, task=args.task)
    if args.backend:
        doc = with_training_backend(doc, args.backend)
    policy = _tier_module("policy") if args.tier or args.profile_as else None
    decision = policy.decide_tier(doc, policy=policy.load_policy(args.policy) if args.policy else
                                  policy.packaged_policy(args.task)) if policy else None
    if args.out:
        _write(Path(args.out), doc)
    if args.json:
        print(json.dumps({**doc, "tier": decision.to_json()} if decision else doc, indent=2))
    else:
        print(format_table(doc))
        if decision:
            print(format_tier(decision))
    return 0


def _step_model(model: str | None, task: str) -> Path:
    """The model folder for --step, checked before any measurement runs."""
    return check_model_dir(model) if model else default_model_dir(task)


def _tier_module(name: str):
    """profiles.policy or profiles.catalog, imported only when a tier is asked for."""
    if importlib.util.find_spec("profiles") is None or importlib.util.find_spec(f"profiles.{name}") is None:
        raise UserError(f"tier policy not installed: the profiles.{name} module is missing; "
                        "install hetlora-edge with its profiles package, or run without --tier/--as")
    return importlib.import_module(f"profiles.{name}")


def _write(path: Path, doc: dict) -> None:
    try:
        path.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the profile to {path}: {exc.strerror}") from None


def _fmt(value, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    return "unknown" if value is None else f"{value / scale:.{digits}f}{unit}"


def format_table(doc: dict) -> str:
    """The profile as aligned label / value lines."""
    ident, cpu, mem, bat = doc["identity"], doc["cpu"], doc["memory"], doc["battery"]
    thermal, comp = doc["thermal"], doc["compute"]
    device = ", ".join(str(v) for v in (ident["model"] or "unknown model", ident["vendor"], ident["platform"],
                                        ident["arch"], ident["os"]) if v)
    if ident.get("jetpack"):
        device += f", L4T {ident['jetpack']}"
    if ident.get("power_mode"):
        device += f", power mode {ident['power_mode']}"
    throttled = {None: "unknown", True: "YES", False: "no"}[cpu["throttled"]]
    reasons = f" ({'; '.join(cpu['throttle_reasons'])})" if cpu["throttle_reasons"] else ""
    if bat["present"]:
        state = "charging" if bat["charging"] else "plugged in" if bat["plugged"] else "on battery"
        battery = f"{_fmt(bat['percent'], '%', digits=0)}, {state}, {_fmt(bat['power_w'], ' W', digits=2)} ({bat['source']})"
    else:
        battery = "none"
    hottest = ", ".join(f"{k} {v:.1f}" for k, v in sorted(thermal["zones"].items(), key=lambda kv: -kv[1])[:4])
    sources = "; ".join(f"{s['name']} ({s['scope']}, {'readable' if s['readable'] else 'NOT readable'})"
                        for s in doc["power_sources"]) or "none (energy can only be estimated)"
    if comp:
        step = _fmt(comp.get("lora_step_s"), " s", digits=3) if comp.get("lora_step_s") is not None else "not measured"
        compute_line = (f"peak {_fmt(comp['peak_gflops'], ' GFLOPS')}, sustained {_fmt(comp['sustained_gflops'], ' GFLOPS')}"
                        f" over {_fmt(comp['duration_s'], ' s')}; LoRA step {step}")
    else:
        compute_line = "not measured (--quick)"
    rows = [
        ("Device", device),
        ("Catalog", ident.get("catalog_id") or "no match"),
        ("CPU", f"{cpu['cores'] or 'unknown'} cores, clock {_fmt(cpu['freq_mhz'], ' MHz', digits=0)} "
                f"(max {_fmt(cpu['max_freq_mhz'], ' MHz', digits=0)}), throttled: {throttled}{reasons}"),
        ("Memory", f"total {_fmt(mem['total_bytes'], ' GB', GB, 2)}, available {_fmt(mem['available_bytes'], ' GB', GB, 2)}, "
                   f"cgroup limit {_fmt(mem['cgroup_limit_bytes'], ' GB', GB, 2) if mem['cgroup_limit_bytes'] else 'none'}, "
                   f"usable {_fmt(mem['usable_bytes'], ' GB', GB, 2)}"),
        ("Battery", battery),
        ("Thermal", f"max {_fmt(thermal['max_c'], ' C')}" + (f" ({hottest})" if hottest else "")),
        ("Compute", compute_line),
        ("Power sources", sources),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def format_tier(decision) -> str:
    lines = [f"Tier  {getattr(decision, 'tier', '')} (rank {decision.rank})"]
    lines += [f"  - {reason}" for reason in decision.reasons]
    return "\n".join(lines)
