"""Learning quality: the demo's fleet per aggregation rule, over seeds, against centralized LoRA and the
task's references. Prints a table (with the fleet's estimated training joules, total and per device tier) and
draws curves.png and energy.png (the final metric against the estimated energy); --results appends the table
(with the exact command) to a Markdown file.

Classification (BANKING77): against head-only federated training and a frozen-feature linear probe.
Chat (--task chat, SmolLM2-135M-Instruct on one person's chats per device): perplexity on replies of people
outside the fleet, against zero-shot, with the papers' claims as methods: homogeneous FedAvg at the smallest
and the largest rank, naive zero padding (hetlora's padding with n-weights and no pruning), HetLoRA with
self-pruning gamma 1.0 (no pruning), 0.99 and 0.85, HLoRA, Fed-PLoRA and centralized LoRA.

    .venv/bin/python benchmarks/bench_quality.py --rounds 20 --seeds 0,1,2           # BANKING77, every method
    .venv/bin/python benchmarks/bench_quality.py --methods hetlora,fedavg-rmin --rounds 20 \\
        --results docs/RESULTS.md
    .venv/bin/python benchmarks/bench_quality.py --data my.csv --test my_test.csv --labels labels.json \\
        --text-column text --label-column intent
    .venv/bin/python benchmarks/bench_quality.py --task chat --seeds 0,1,2 --results docs/RESULTS.md

Methods: fedavg-rmin / fedavg-rmax (homogeneous FedAvg at the smallest / largest rank), hetlora,
hetlora-seg (segment averaging), hlora, plora, head-only (federated, LoRA learning rate 0),
centralized (LoRA at the largest rank on the pooled data, same settings and total steps), probe
(logistic regression on the frozen model's pooled features; C chosen on a validation split carved
from the training rows). Each federated run is a real `hetlora demo` fleet (server + client processes).
`--validation-fraction` evaluates on held-out training rows instead of the test set (for tuning).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hetlora.protocol.settings import LR_DECAYS  # noqa: E402
from simulation.centralized import centralized_run  # noqa: E402
from simulation.demo import CHAT_TRAINING, DemoConfig, Method, federated_run  # noqa: E402
from simulation.energy import energy_cells, energy_summary  # noqa: E402
from simulation.fleets import prepare_fleet  # noqa: E402
import quality_chat  # noqa: E402

DATA = REPO / "hetlora" / "data" / "banking77"
METHODS = ("fedavg-rmin", "fedavg-rmax", "hetlora", "hetlora-seg", "hlora", "plora", "head-only", "centralized",
           "probe")
TARGETS = (0.80, 0.85)


def method_for(name: str, ranks: tuple[int, ...]) -> Method:
    lo, hi = min(ranks), max(ranks)
    return {"fedavg-rmin": Method(name, "fedavg", (lo,)), "fedavg-rmax": Method(name, "fedavg", (hi,)),
            "hetlora": Method(name, "hetlora", ranks),
            "hetlora-seg": Method(name, "hetlora", ranks, ("--segment-average",)),
            "hlora": Method(name, "hlora", ranks), "plora": Method(name, "plora", ranks),
            "head-only": Method(name, "fedavg", (lo,), ("--lr", "0")),
            "zeropad": Method(name, "hetlora", ranks, ("--weighting", "n", "--prune-lambda", "0")),
            "hetlora-g1": Method(name, "hetlora", ranks, ("--prune-gamma", "1.0")),
            "hetlora-g085": Method(name, "hetlora", ranks, ("--prune-gamma", "0.85"))}[name]


def run_method(name: str, cfg: DemoConfig, fleet) -> list:
    """A fresh run of `name` (a folder left by an earlier run with other settings is removed first)."""
    shutil.rmtree(cfg.out / name, ignore_errors=True)
    rows = []
    if name == "centralized":
        return centralized_run(cfg, fleet, rows.append)
    return federated_run(cfg, method_for(name, cfg.ranks), fleet, rows.append)


def summarize_run(rows: list) -> dict:
    """Final and best accuracy, final macro-F1, the first round / cumulative seconds at each target, the
    curve: [round, accuracy] per evaluated round, and the estimated fleet energy, total and per device tier."""
    acc = [r.accuracy for r in rows]
    seconds = np.cumsum([r.seconds for r in rows])
    reach = {}
    for target in TARGETS:
        hit = next((i for i, a in enumerate(acc) if a >= target), None)
        reach[target] = (rows[hit].round, float(seconds[hit])) if hit is not None else (None, None)
    return {"final": acc[-1], "best": max(acc), "f1": rows[-1].macro_f1, "reach": reach,
            "curve": [[r.round, r.accuracy] for r in rows]} | energy_summary(rows)


def run_summary(name: str, cfg: DemoConfig, fleet, seed: int) -> dict:
    """Run (or compute) method `name` and summarize it for the task's table."""
    if name == "probe":
        return linear_probe(cfg, fleet, seed)
    if name == "zero-shot":
        return quality_chat.zero_shot(fleet)
    rows = run_method(name, cfg, fleet)
    return quality_chat.summarize(rows) if cfg.task == "chat" else summarize_run(rows)


def linear_probe(cfg: DemoConfig, fleet, seed: int) -> dict:
    """Logistic regression on the frozen model's pooled features (the head's input)."""
    from edge_client.evaluate import accuracy, macro_f1
    from edge_client.training import TorchTrainer

    trainer = TorchTrainer(cfg.model_dir, "classification", labels=fleet.labels)
    train_x, train_y = trainer.frozen_features(fleet.pooled, cfg.training.seq_len)
    test_x, test_y = trainer.frozen_features(fleet.test, cfg.training.seq_len)
    predicted = fit_probe(train_x, train_y, seed).predict(test_x)
    return {"final": accuracy(test_y, predicted), "best": accuracy(test_y, predicted), "f1": macro_f1(test_y, predicted), "reach": None}  # no rounds: a reference, not a run


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, seed: int):
    """Logistic regression on all the training rows, C of 1, 10, 100 chosen on a seeded tenth of them."""
    from sklearn.linear_model import LogisticRegression

    order = np.random.default_rng(seed).permutation(len(train_y))
    val, fit = order[: len(order) // 10], order[len(order) // 10:]
    scores = {c: LogisticRegression(C=c, max_iter=2000).fit(train_x[fit], train_y[fit]).score(train_x[val], train_y[val])
              for c in (1.0, 10.0, 100.0)}
    return LogisticRegression(C=max(scores, key=scores.get), max_iter=2000).fit(train_x, train_y)


def run_settings(cfg: DemoConfig, name: str) -> dict:
    """What a run's result depends on: every setting but the output folder, the data files by content
    (so a run stored from another checkout still counts), and the method."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "data", "test", "labels", "training")}
    if cfg.task == "classification":  # runs stored before the chat task existed
        settings = {k: v for k, v in settings.items() if k not in ("task", "min_replies")}
    t = cfg.training  # flat, under the names runs were stored with before DemoConfig carried TrainingSettings
    settings |= {"local_steps": t.steps, "batch_size": t.batch_size, "seq_len": t.seq_len, "lr": t.lr,
                 "head_lr": t.head_lr, "schedule": t.schedule, "warmup_steps": t.warmup_steps,
                 "prune_lambda": t.prune_lambda}
    if cfg.lr_decay == "none":  # runs stored before the decay existed had none
        del settings["lr_decay"]
    if cfg.head_rounds:  # runs stored before head rounds existed had none: they still count for --head-rounds 0
        settings |= {"head_epochs": t.head_epochs, "head_fit_lr": t.head_fit_lr}
    else:
        del settings["head_rounds"]
    files = {k: hashlib.sha256(Path(getattr(cfg, k)).read_bytes()).hexdigest() for k in ("data", "test", "labels")
             if getattr(cfg, k)}
    return json.loads(json.dumps({**settings, **files, "method": name}, default=str))


def store_summary(cfg: DemoConfig, name: str, summary: dict) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    record = {"settings": run_settings(cfg, name), "summary": summary}
    (cfg.out / f"{name}.summary.json").write_text(json.dumps(record, indent=1, default=str) + "\n")


def stored_summary(cfg: DemoConfig, name: str) -> dict | None:
    """A finished run's summary, if one was stored with exactly these settings."""
    path = cfg.out / f"{name}.summary.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("settings") != run_settings(cfg, name):
        return None
    summary = record["summary"]
    if summary.get("reach") is not None:  # JSON keys are strings; the table looks targets up as floats
        summary["reach"] = {float(k): v for k, v in summary["reach"].items()}
    return summary


def versus(runs: list[dict], baseline: list[dict] | None) -> str:
    """Difference of mean final accuracy to the baseline's, in points and in pooled standard deviations
    sqrt((s_a^2 + s_b^2) / 2)."""
    if not baseline or runs is baseline:
        return "-"
    a, b = [r["final"] for r in runs], [r["final"] for r in baseline]
    diff = np.mean(a) - np.mean(b)
    spread = np.sqrt((np.var(a) + np.var(b)) / 2)
    return f"{100 * diff:+.1f} pt" + (f" ({diff / spread:+.1f} sd)" if spread > 0 else "")


def table(results: dict[str, list[dict]], rounds: int) -> str:
    def mean_std(values):
        values = [v for v in values if v is not None]
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"

    def reach(runs, target, k):
        if any(r["reach"] is None for r in runs):
            return "-"
        hits = [r["reach"][target][k] for r in runs]
        done = [h for h in hits if h is not None]
        if not done:
            return "never"
        text = f"{np.mean(done):.1f}" if k == 0 else f"{np.mean(done):.0f}"
        return text + ("" if len(done) == len(hits) else f" ({len(done)}/{len(hits)})")

    head = ("| method | seeds | final accuracy | final macro-F1 | best round accuracy | vs fedavg-rmin "
            "| rounds to 80% | s to 80% | rounds to 85% | s to 85% | fleet J (est.) | J / device-round by tier |")
    lines = [head, "|" + "---|" * 12]
    for name, runs in results.items():
        if not runs:
            continue
        lines.append(f"| {name} | {len(runs)} | {mean_std([r['final'] for r in runs])} | {mean_std([r['f1'] for r in runs])} "
                     f"| {mean_std([r['best'] for r in runs])} | {versus(runs, results.get('fedavg-rmin'))} | {reach(runs, 0.80, 0)} | {reach(runs, 0.80, 1)} "
                     f"| {reach(runs, 0.85, 0)} | {reach(runs, 0.85, 1)} | {' | '.join(energy_cells(runs))} |")
    return "\n".join(lines)


def plot_curves(results: dict[str, list[dict]], path: Path, metric: str = "accuracy") -> Path | None:
    """Mean `metric` over the seeds against the round, one line per method with stored curves (summaries
    stored before curves were kept have none)."""
    from hetlora.plots import line_plot

    series = {}
    for name, runs in results.items():
        curves = [r["curve"] for r in runs if r.get("curve")]
        if curves and len({len(c) for c in curves}) == 1:
            rounds = [point[0] for point in curves[0]]
            mean = np.mean([[point[1] for point in c] for c in curves], axis=0)
            series[f"{name} ({len(curves)} seeds)"] = (rounds, [list(mean)])
    if not series:
        return None
    return line_plot(path, series, panels=[(f"{metric}, mean over seeds", 0)], xlabel="round",
                     title="Learning quality per method")


def plot_energy(results: dict[str, list[dict]], path: Path, metric: str = "accuracy") -> Path | None:
    """Mean final `metric` against the mean estimated fleet energy over the seeds, one point per rule (methods
    without a fleet, and summaries stored before energy was reported, have none)."""
    from hetlora.plots import line_plot

    series = {}
    for name, runs in results.items():
        pairs = [(r["energy_j"], r["final"]) for r in runs if r.get("energy_j") is not None]
        if pairs:
            series[f"{name} ({len(pairs)} seeds)"] = ([np.mean([e for e, _ in pairs])],
                                                      [[np.mean([f for _, f in pairs])]])
    if not series:
        return None
    return line_plot(path, series, panels=[(f"final {metric}, mean over seeds", 0)],
                     xlabel="fleet training energy (J, estimated), mean over seeds", title="Quality per joule")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("classification", "chat"), default="classification")
    p.add_argument("--model", help="base model folder (default: the task's bundled model)")
    p.add_argument("--data", help="training data (default: BANKING77's train split / the bundled chats)")
    p.add_argument("--test", help="test data (default: BANKING77's test split / the chat split's own)")
    p.add_argument("--labels", help="classification labels (default: the BANKING77 intents)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column")
    p.add_argument("--methods", help=f"comma-separated, of {', '.join(METHODS)} (classification) or "
                                     f"{', '.join(quality_chat.METHODS)} (chat); default: all of the task's")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, help="LoRA rounds (default 20; chat 5, as the demo)")
    p.add_argument("--lr", type=float, help="chat: the LoRA learning rate (default: the demo's)")
    p.add_argument("--eval-rows", type=int, default=100, help="chat: rows of each evaluation set (default 100)")
    p.add_argument("--head-rounds", type=int, default=DemoConfig.head_rounds,
                   help=f"head rounds before the LoRA rounds (default {DemoConfig.head_rounds}, as the demo)")
    p.add_argument("--lr-decay", choices=LR_DECAYS, default=DemoConfig.lr_decay,
                   help="learning rates across the LoRA rounds (hetlora serve --lr-decay)")
    p.add_argument("--validation-fraction", type=float, default=0.0)
    p.add_argument("--out", default="runs/bench-quality")
    p.add_argument("--results", help="append the table and the command to this Markdown file")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished (seed, method) runs stored under --out with the same settings")
    p.add_argument("--stored-only", action="store_true",
                   help="run nothing: print the table of the runs stored under --out with these settings")
    args = p.parse_args()
    from hetlora.output import configure

    configure(-1)  # third-party import chatter (torchao, pytree) off, as in the hetlora command
    import torch

    from hetlora.models.bundled import default_model_dir

    torch.set_num_threads(1)  # as `hetlora demo`: evaluation and centralized training run beside the fleet

    chat = args.task == "chat"
    known = quality_chat.METHODS if chat else METHODS
    methods = [m.strip() for m in (args.methods or ",".join(known)).split(",") if m.strip()]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(known)}")
    task_model = "causal-lm" if chat else "classification"
    base = DemoConfig(model_dir=str(args.model or default_model_dir(task_model)), task=args.task,
                      data=args.data or (None if chat else str(DATA / "train.csv")),
                      test=args.test or (None if chat else str(DATA / "test.csv")),
                      labels=None if chat else args.labels or str(DATA / "categories.json"), out=Path(args.out),
                      rounds=args.rounds or (5 if chat else 20), head_init="none" if chat else "lda",
                      head_rounds=0 if chat else args.head_rounds, lr_decay=args.lr_decay,
                      training=replace(CHAT_TRAINING, lr=args.lr or CHAT_TRAINING.lr) if chat else DemoConfig.training,
                      text_column=args.text_column, label_column=args.label_column,
                      validation_fraction=args.validation_fraction)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    t0 = time.monotonic()
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = replace(base, seed=seed, out=Path(args.out) / f"seed{seed}")
        fleet = None
        for name in methods:
            summary = stored_summary(cfg, name) if args.resume or args.stored_only else None
            if summary is None and args.stored_only:
                continue
            if summary is None:
                fleet = fleet or prepare_fleet(cfg, eval_rows=args.eval_rows if chat else None)
                summary = run_summary(name, cfg, fleet, seed)
                store_summary(cfg, name, summary)
            results[name].append(summary | {"seed": seed})
            print(f"seed {seed} {name}: final {summary['final']:.3f}, best {summary['best']:.3f}", flush=True)
            (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    text = quality_chat.table(results) if chat else table(results, args.rounds)
    print(text)
    metric = "perplexity" if chat else "accuracy"
    plots = [p for p in (plot_curves(results, Path(args.out) / "curves.png", metric),
                         plot_energy(results, Path(args.out) / "energy.png", metric)) if p]
    print(f"total {time.monotonic() - t0:.0f} s" + (f"; plots: {', '.join(map(str, plots))}" if plots else ""))
    if args.results:
        command = "python benchmarks/bench_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        with open(args.results, "a") as fh:
            fh.write(f"\n```\n{command}\n```\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
