"""The chat task's part of bench_quality: its methods, run summaries, the zero-shot reference and the table.

Perplexity is lower-is-better; a run's "final" is its last round's perplexity on replies of people outside
the fleet, "personal" the same on held-out conversations of the fleet's own people, "best" the lowest round;
"energy_j" the fleet's estimated training joules and "tiers" them per device tier (simulation.energy).
"""

from __future__ import annotations

import numpy as np

from simulation.energy import energy_cells, energy_summary

METHODS = ("zero-shot", "fedavg-rmin", "fedavg-rmax", "zeropad", "hetlora-g1", "hetlora", "hetlora-g085", "hlora",
           "plora", "centralized")


def summarize(rows: list) -> dict:
    ppl = [r.perplexity for r in rows]
    personal = [r.personal_perplexity for r in rows if r.personal_perplexity is not None]
    return {"final": ppl[-1], "best": min(ppl), "zero_shot": ppl[0], "personal": personal[-1] if personal else None,
            "ranks": [r.mean_rank for r in rows[1:]], "curve": [[r.round, r.perplexity] for r in rows]} \
        | energy_summary(rows)


def zero_shot(fleet) -> dict:
    """The base model alone (an adapter without factors merges nothing)."""
    from hetlora.protocol.wire import Adapter

    metrics = fleet.evaluate(Adapter(lora={}, dense={}, meta={}))
    return {"final": metrics["perplexity"], "best": metrics["perplexity"], "zero_shot": metrics["perplexity"],
            "personal": metrics.get("personal_perplexity"), "ranks": [], "curve": None}


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "-"


def _ratio(runs: list[dict], reference: list[dict] | None) -> str:
    """Mean over the seeds both have of final / the reference's final on the same seed, ± its standard deviation
    (with the number of seeds when it is not every seed of `runs`)."""
    if not reference or runs is reference:
        return "-"
    finals = {r.get("seed"): r["final"] for r in reference}
    ratios = [r["final"] / finals[r.get("seed")] for r in runs if r.get("seed") in finals]
    if not ratios:
        return "-"
    paired = f" ({len(ratios)} seeds)" if len(ratios) < len(runs) else ""
    return f"{np.mean(ratios):.3f} ± {np.std(ratios):.3f}{paired}"


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| method | seeds | final perplexity (unseen people) | x zero-shot | x fedavg-rmin | x centralized "
             "| final personal perplexity | best round | mean rank | fleet J (est.) | J / device-round by tier |",
             "|" + "---|" * 11]
    for name, runs in results.items():
        if not runs:
            continue
        zero = [{"final": r["zero_shot"], "seed": r.get("seed")} for r in runs]
        ranks = [np.mean(r["ranks"]) for r in runs if r["ranks"]]
        lines.append(f"| {name} | {len(runs)} | {_mean_std([r['final'] for r in runs])} | {_ratio(runs, zero)} "
                     f"| {_ratio(runs, results.get('fedavg-rmin'))} | {_ratio(runs, results.get('centralized'))} "
                     f"| {_mean_std([r['personal'] for r in runs])} | {_mean_std([r['best'] for r in runs])} "
                     f"| {f'{np.mean(ranks):.1f}' if ranks else '-'} | {' | '.join(energy_cells(runs))} |")
    return "\n".join(lines)
