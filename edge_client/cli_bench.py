"""Per-rank training step benchmark: latency (p50/p90/p99, mean, std), tokens/s (all and non-pad), peak
RSS, energy per step and per token (measured, estimated or unavailable, always labelled), achieved GFLOPS
and its fraction of the matmul peak, and upload bytes, for every backend x rank.

The peak is measured before and after the cells (the higher counts) on the step's own linear-map GEMMs
at the step's torch threads; a fraction above 100% is shown as 100% and flagged "peak underestimated".
Without a power meter, energy is estimated from CPU utilisation and the catalog's figure for the
device, or --watts (its full-load power); else it is unavailable.

Writes bench.json (versioned, with the device profile and settings), bench.csv, latency_vs_rank.png
and energy_vs_rank.png into --out, and prints a table (--json prints the document instead).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from pathlib import Path

from hetlora.argtypes import add_renamed, positive_int_list
from hetlora.errors import UserError
from edge_client.bench.runner import Settings
from edge_client.bench.steppers import BACKENDS
from edge_client.bench.peak import best_of, step_peak
from edge_client.model_check import check_adapter_base, check_head, head_labels
from hetlora.protocol.wire import WireFormatError, decode
from edge_client.device.energy import meter_for
from edge_client.backends.artifacts import load_manifest
from edge_client.bench import cost, report, runner, steppers
from edge_client.bench.worker import BackendWorker
from hetlora.output import verbosity
from edge_client.device.host import Host
from edge_client.device.profile import collect_profile
from hetlora.models.bundled import default_model_dir
from hetlora.models.folders import check_model_dir, default_targets, model_type
from profiles.memory_model import ModelShape

log = logging.getLogger("hetlora.bench")
NUM_LABELS = 77  # the demo's banking77 head, unless the artifacts say otherwise
DEVICE = {"steps": 20, "min_seconds": 10.0, "warmup": 2, "repetitions": 2, "idle_seconds": 5.0}
QUICK = {"steps": 4, "min_seconds": 1.5, "warmup": 1, "repetitions": 2, "idle_seconds": 1.0}
DEFAULT_SHAPE = (16, 64)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=positive_int_list, default=(4, 8, 16, 32, 64), help="LoRA ranks (default 4,8,16,32,64)")
    parser.add_argument("--backends", default="torch,onnx,executorch",
                        help="comma-separated: torch, onnx, executorch (default all; unavailable ones are skipped)")
    parser.add_argument("--task", choices=("classification", "causal-lm"),
                        help="the model's task (default: the artifacts' task, else classification)")
    parser.add_argument("--model", metavar="DIR", help="model folder (default: the task's bundled model). A folder "
                        "with a trained classification head is benched with that head (its label count and "
                        "weights); a base model gets a new head of the artifacts' label count, else of "
                        f"{NUM_LABELS} (the demo's)")
    parser.add_argument("--adapter", metavar="FILE", help="a wire adapter (e.g. a run's global.safetensors) whose "
                        "classification head bench trains instead of the model folder's or a new one")
    parser.add_argument("--out", metavar="DIR", default="bench-results", help="output folder (default bench-results)")
    parser.add_argument("--artifacts", metavar="DIR", help="artifacts of `hetlora export` for the onnx/executorch backends")
    add_renamed(parser, "--batch-size", "--batch", type=int,
                help=f"batch size (default: the artifacts' or {DEFAULT_SHAPE[0]})")
    parser.add_argument("--seq-len", type=int, help=f"tokens per row (default: the artifacts' or {DEFAULT_SHAPE[1]})")
    parser.add_argument("--steps", type=int, help=f"timed steps per cell, at least (default {DEVICE['steps']})")
    parser.add_argument("--min-seconds", type=float,
                        help=f"timed seconds per cell, at least (default {DEVICE['min_seconds']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps before each segment (default {DEVICE['warmup']})")
    parser.add_argument("--repetitions", type=int,
                        help=f"segments per cell, ranks interleaved between them (default {DEVICE['repetitions']})")
    parser.add_argument("--quick", action="store_true", help="short settings: about a minute for MiniLM on a laptop")
    parser.add_argument("--peak-gflops", type=float, help="the device's matmul peak (skip measuring it)")
    parser.add_argument("--watts", type=float, help="the device's full-load power in watts: without a power meter, "
                                                    "energy is estimated as this x CPU utilisation (labelled estimated)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    parser.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a fake /sys + /proc tree


def resolve_settings(args, manifest):
    """Settings from the flags, the --quick or device defaults, and the artifacts' exported shape."""
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UserError(f"unknown backend(s) {unknown or '(none given)'}; choose from {', '.join(BACKENDS)}")
    base = QUICK if args.quick else DEVICE
    shape = (manifest.batch, manifest.seq_len) if manifest else DEFAULT_SHAPE
    values = {"batch": shape[0] if args.batch_size is None else args.batch_size,
              "seq_len": shape[1] if args.seq_len is None else args.seq_len,
              **{k: base[k] if getattr(args, k) is None else getattr(args, k)
                 for k in ("steps", "min_seconds", "warmup", "repetitions")}}
    for name, flag in (("batch", "batch-size"), ("seq_len", "seq-len"), ("steps", "steps"),
                       ("repetitions", "repetitions")):
        if values[name] < 1:
            raise UserError(f"--{flag} must be >= 1, got {values[name]}")
    if values["warmup"] < 0 or values["min_seconds"] < 0:
        raise UserError("--warmup and --min-seconds must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.peak_gflops is not None and args.peak_gflops <= 0:
        raise UserError(f"--peak-gflops must be positive, got {args.peak_gflops}")
    if args.watts is not None and args.watts <= 0:
        raise UserError(f"--watts must be positive, got {args.watts}")
    return Settings(ranks=tuple(args.ranks), backends=backends, **values)


def measure_peak(shape, settings, quick: bool) -> dict:
    """The matmul peak of the step's GEMM shapes at the current torch threads (edge_client/bench/peak.py)."""
    return step_peak(shape, settings.batch, settings.seq_len, seconds_per_shape=0.2 if quick else 0.5)


def output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {out}: {exc.strerror}") from None
    return out


def bench_task(args, manifest) -> str:
    """--task, else the artifacts' task, else classification; a --task the artifacts were not made for is an error."""
    exported = manifest.doc["task"] if manifest else None
    if args.task and exported and args.task != exported:
        raise UserError(f"--task {args.task}, but the artifacts in {manifest.folder} are for {exported}")
    return args.task or exported or "classification"


def adapter_head(path: str, model_dir, task: str) -> int:
    """The label count of the classification head in the wire adapter at `path`, checked against the base model
    (UserError: not a readable adapter, no head, another base model)."""
    if task != "classification":
        raise UserError("--adapter gives bench a classification head; this is a causal-lm bench")
    try:
        adapter = decode(Path(path).read_bytes())
    except (OSError, WireFormatError) as exc:
        raise UserError(f"--adapter {path} is not a readable wire adapter: {exc}") from None
    weights = [t for t in adapter.dense.values() if t.ndim == 2]
    if len(weights) != 1:
        raise UserError(f"--adapter {path} carries no classification head (dense tensors: {sorted(adapter.dense)})")
    check_adapter_base(adapter, model_dir, task, num_labels=int(weights[0].shape[0]))
    return int(weights[0].shape[0])


def head_and_alpha(manifest, task: str, model_dir, adapter: str | None = None) -> tuple[int | None, float, str]:
    """(num_labels, lora_alpha, where the head comes from): with artifacts, their label count and alpha (a model
    folder's own head must have that count: check_head); else the model folder's own trained classification head
    when it has one (loaded with its weights), else a new head of the demo's banking77 size; alpha 16; the head
    of the wire adapter at `adapter` over all of these. UserError when the chosen head does not fit. A causal LM
    has no label count."""
    alpha = float(manifest.doc["lora_alpha"]) if manifest else 16.0
    if task != "classification":
        return None, alpha, "the causal LM's output layer"
    own = head_labels(model_dir)
    if adapter is not None:
        adapter_labels = adapter_head(adapter, model_dir, task)
        check_head(model_dir, task, adapter_labels)
        if manifest is not None and int(manifest.doc.get("num_labels") or 0) != adapter_labels:
            raise UserError(f"the --adapter head has {adapter_labels} labels, the artifacts in {manifest.folder} "
                            f"{manifest.doc.get('num_labels')}")
        return adapter_labels, alpha, f"the --adapter head ({adapter_labels} labels)"
    if manifest is not None:
        num_labels = int(manifest.doc.get("num_labels") or NUM_LABELS)
    else:
        num_labels = own or NUM_LABELS
    check_head(model_dir, task, num_labels)
    source = "the model folder's trained head" if own == num_labels else "a new head"
    return num_labels, alpha, f"{source} ({num_labels} labels)"


def idle_measured_meter(host, args):
    """(energy meter, idle seconds): the best source, or an estimate from the catalog or --watts, idle power known."""
    meter = meter_for(host, user_watts=args.watts)
    idle_s = (QUICK if args.quick else DEVICE)["idle_seconds"]
    log.info("measuring idle power for %.0f s (%s)", idle_s, meter.status)
    meter.measure_idle(idle_s)
    return meter, idle_s


def run(args) -> int:
    # torch and transformers load when the command runs: its --help and argument errors stay instant
    from hetlora.models.adapter_spec import derive_spec

    if not Path(args.root).is_dir():
        raise UserError(f"--root {args.root} is not a directory")
    manifest = load_manifest(args.artifacts) if args.artifacts else None
    task = bench_task(args, manifest)
    model_dir = check_model_dir(args.model) if args.model else default_model_dir(task)
    settings = resolve_settings(args, manifest)
    out = output_dir(args.out)
    targets = tuple(manifest.doc["targets"]) if manifest else default_targets(model_dir)
    num_labels, lora_alpha, head = head_and_alpha(manifest, task, model_dir, args.adapter)
    log.info("benching %s with %s", model_dir, head)
    spec = derive_spec(model_dir, task, targets, num_labels)
    shape = ModelShape.from_model_dir(model_dir)
    skip = {b: steppers.skip_reason(b, manifest, settings.batch, settings.seq_len) for b in settings.backends}

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    host = Host.of(args.root)
    log.info("profiling the device and measuring the matmul peak of the step's GEMM shapes")
    profile = collect_profile(args.root, quick=True)
    given = {"value": args.peak_gflops, "source": "--peak-gflops"} if args.peak_gflops else None
    peak = given or measure_peak(shape, settings, args.quick)
    meter, idle_s = idle_measured_meter(host, args)

    config = {"task": task, "model_dir": str(model_dir), "artifacts": args.artifacts, "adapter": args.adapter,
              "targets": list(targets),
              "num_labels": num_labels, "lora_alpha": lora_alpha, "batch": settings.batch, "seq_len": settings.seq_len,
              "vocab": shape.vocab, "threads": torch.get_num_threads(), "verbosity": verbosity()}

    def open_stepper(backend: str):
        return BackendWorker(backend, config)

    runs, skipped = runner.run_cells(settings, open_stepper, skip, meter, host)
    if not given:
        peak = best_of(peak, measure_peak(shape, settings, args.quick))
    cells = _cells(runs, settings, shape, spec, peak["value"])
    model = {"dir": str(model_dir), "task": task, "model_type": model_type(model_dir), "targets": list(targets),
             "num_labels": num_labels, "head": head, "lora_alpha": lora_alpha, "model_hash": spec.model_hash}
    doc = _report_doc(args, settings, idle_s, model, peak, meter, profile) | {"cells": cells, "skipped": skipped}
    doc["plots"] = report.write_plots(out, cells)
    report.write_csv(out / "bench.csv", cells)
    report.write_json(out / "bench.json", doc)
    print(json.dumps(doc, indent=2, default=str) if args.json else report.table(doc))
    if not args.json:
        print(f"wrote {out / 'bench.json'}, {out / 'bench.csv'} and the PNG plots")
    return 0


def _cells(runs, settings, shape, spec, peak_gflops: float) -> list[dict]:
    """Each measured (rank, backend) cell with its FLOPs, share of the peak and upload size."""
    real_tokens = settings.batch * settings.seq_len  # synthetic full-length rows (steppers.synthetic_batch)
    return [runner.summarize_cell(
        r, batch=settings.batch, seq_len=settings.seq_len, peak_gflops=peak_gflops, real_tokens=real_tokens,
        flops_per_step=cost.training_step_flops(shape, spec, r.computed_rank, settings.batch, settings.seq_len),
        upload_bytes=cost.rank_upload_bytes(spec, r.rank)) for r in runs]


def _report_doc(args, settings, idle_s: float, model: dict, peak: dict, meter, profile: dict) -> dict:
    """bench.json without its cells: when, with which settings, model, peak, energy meter and device profile."""
    import torch

    return {
        "schema": report.SCHEMA, "version": report.VERSION,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {**settings.__dict__, "quick": args.quick, "idle_seconds": idle_s,
                     "torch_threads": torch.get_num_threads(),
                     "order": "ranks interleaved across repetitions (ABCABC), per rank every backend in turn, "
                              "each backend in its own process (peak RSS its own)",
                     "optimizer": "adamw on every backend (artifact backends: in the client, on the artifact's gradients)",
                     "data": "synthetic full-length rows (every position attended; causal-lm: every next token a target)",
                     "peak_rss": "process RSS high-water over the timed steps (model, runtime and activations)"},
        "model": model,
        "artifacts": str(args.artifacts) if args.artifacts else None,
        "flops_formula": "4*P_mm*T + 6*P_lora(r)*T + 12*L*b*s^2*h, T = b*s (edge_client/bench/cost.py)",
        "peak_gflops": peak,
        "energy_meter": {"status": meter.status, "idle_w": meter.idle_w,
                         "source": meter.source.name if meter.source else None,
                         "scope": meter.source.scope if meter.source else None,
                         "model": meter.source.model if meter.source else None,
                         "note": None if meter.source else meter.unavailable_note},
        "profile": profile,
    }
