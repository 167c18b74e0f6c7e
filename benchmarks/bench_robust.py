"""What each --robust option keeps of the demo's accuracy with 3 of 8 clients adversarial (x100 scaled updates).

For every option (none, trimmed-mean, median, norm-bound) the demo (`hetlora demo`: a real server and 8 real
client processes on BANKING77, 20 head rounds and 6 LoRA rounds) runs twice with the same seed: clean, and with
the first 3 clients by name uploading start + 100 x (their update - start) in every head and LoRA round (the
hidden test tool `hetlora client --testing-scale-update`). Prints the final test accuracy of each run and the
drop from the clean run without a robust option. About 4 minutes per run on 2 idle cores.

    python benchmarks/bench_robust.py --out runs/robust [--options none,median] [--adversarial 3] [--eval-rows N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

OPTIONS = ("none", "trimmed-mean", "median", "norm-bound")


def run_demo(out: Path, robust: str, adversarial: int, scale: float, extra: list[str]) -> list[dict]:
    """One demo run (skipped when its results.json exists); its result rows."""
    results = out / "results.json"
    if not results.exists():
        subprocess.run([sys.executable, "-m", "hetlora.cli", "-q", "demo", "--task", "classification", "--robust", robust, "--out", str(out),
                        "--testing-adversarial", str(adversarial), "--testing-attack-scale", str(scale), *extra],
                       check=True, stdout=subprocess.DEVNULL)
    return json.loads(results.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/robust")
    p.add_argument("--options", default=",".join(OPTIONS))
    p.add_argument("--adversarial", type=int, default=3)
    p.add_argument("--scale", type=float, default=100.0)
    p.add_argument("--eval-rows", type=int)
    args = p.parse_args()
    extra = ["--eval-rows", str(args.eval_rows)] if args.eval_rows else []
    table = {}
    for robust in args.options.split(","):
        for label, adversarial in (("clean", 0), ("attacked", args.adversarial)):
            rows = run_demo(Path(args.out) / f"{robust}-{label}", robust, adversarial, args.scale, extra)
            table[robust, label] = rows
            print(f"{robust:<13} {label:<9} final accuracy {rows[-1]['accuracy']:.3f}", flush=True)
    reference = table.get(("none", "clean"))
    print(f"\n| --robust | clean | {args.adversarial} of 8 x{args.scale:g} | head rounds (attacked) | drop from the clean "
          f"run without --robust |\n|---|---|---|---|---|")
    for robust in args.options.split(","):
        clean, attacked = table[robust, "clean"], table[robust, "attacked"]
        head = next((r["accuracy"] for r in attacked if r["stage"] == "head-fit"), float("nan"))
        drop = (reference[-1]["accuracy"] - attacked[-1]["accuracy"]) * 100 if reference else float("nan")
        print(f"| {robust} | {clean[-1]['accuracy']:.3f} | {attacked[-1]['accuracy']:.3f} | {head:.3f} | "
              f"{drop:.1f} points |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
