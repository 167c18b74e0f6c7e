"""The demo's training energy: ESTIMATED joules (each client's watts x its measured training seconds, as its
uploads reported them: hetlora.protocol.energy), per table row and device tier, cumulated over a run, and the
task's metric against them.

A device's tier is the rank the tier policy gave it (`Fleet.tiers`). The demo's clients all train on this
machine: the seconds are this machine's, the watts the catalog figure of the device each client presents.
"""

from __future__ import annotations

import json
from pathlib import Path

from hetlora.plots import line_plot

# The quality the energy plot shows per task: the RoundRow field and its axis label.
QUALITY = {"classification": ("accuracy", "test accuracy"), "chat": ("perplexity", "held-out perplexity")}
NOTE = "estimated: each device's watts (--watts or its catalog figure) x its measured training seconds"


def client_tiers(status: dict, tiers: dict) -> dict[str, int]:
    """client id -> its device's tier (the policy's rank, `tiers[name].rank`) for the registered clients."""
    return {c["client_id"]: tiers[c["name"]].rank for c in status["clients"] if c.get("name") in tiers}


def tier_energy(entries: list[dict], tier_of: dict[str, int]) -> dict[str, dict]:
    """Per tier (str(rank); "?" for a client without one) of the history `entries`: the known joules, the
    device-rounds they cover and the device-rounds whose energy is unknown (no report, or no watts)."""
    tiers: dict[str, dict] = {}
    for entry in entries:
        for client, report in (entry.get("energy") or {}).get("clients", {}).items():
            slot = tiers.setdefault(str(tier_of.get(client, "?")), {"joules": 0.0, "device_rounds": 0, "unknown": 0})
            if report is None or report["joules"] is None:
                slot["unknown"] += 1
            else:
                slot["joules"] += report["joules"]
                slot["device_rounds"] += 1
    return tiers


def tier_totals(rows: list) -> dict[str, dict]:
    """The per-tier figures of `rows` (one run's RoundRows) summed, with joules per device-round, by tier rank."""
    totals: dict[str, dict] = {}
    for row in rows:
        for tier, figures in (row.tier_energy or {}).items():
            slot = totals.setdefault(tier, {"joules": 0.0, "device_rounds": 0, "unknown": 0})
            for key, value in figures.items():
                slot[key] += value
    for slot in totals.values():
        slot["joules_per_device_round"] = slot["joules"] / slot["device_rounds"] if slot["device_rounds"] else None
    return dict(sorted(totals.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 1 << 30))


def by_method(rows: list) -> dict[str, list]:
    """The rows of each method that has energy figures (a federated run; not the centralized baseline)."""
    methods: dict[str, list] = {}
    for row in rows:
        if row.energy_j is not None:
            methods.setdefault(row.method, []).append(row)
    return methods


def tier_summary(rows: list) -> dict:
    """Per method: its total estimated joules and `tier_totals` (energy.json)."""
    return {"note": NOTE, "methods": {method: {"joules": runs[-1].energy_j, "tiers": tier_totals(runs)}
                                      for method, runs in by_method(rows).items()}}


def format_tiers(summary: dict) -> str:
    """The per-tier table the demo prints."""
    lines = [f"training energy per device tier ({NOTE})",
             f"{'method':<12} {'tier':>5} {'device-rounds':>13} {'J / device-round':>16} {'J total':>10} "
             f"{'unknown':>7}"]
    for method, figures in summary["methods"].items():
        for tier, t in figures["tiers"].items():
            per = f"{t['joules_per_device_round']:.2f}" if t["joules_per_device_round"] is not None else "-"
            lines.append(f"{method:<12} {'r' + tier:>5} {t['device_rounds']:>13} {per:>16} {t['joules']:>10.1f} "
                         f"{t['unknown']:>7}")
        lines.append(f"{method:<12} {'all':>5} {'':>13} {'':>16} {figures['joules']:>10.1f}")
    return "\n".join(lines)


def plot_energy(rows: list, path: Path, task: str) -> Path | None:
    """The task's metric against the cumulative fleet energy, one line per method."""
    key, label = QUALITY[task]
    series = {method: ([r.energy_j for r in runs], [[getattr(r, key) for r in runs]])
              for method, runs in by_method(rows).items()}
    if not series:
        return None
    return line_plot(path, series, panels=[(label, 0)], xlabel="cumulative fleet training energy (J, estimated)",
                     title="Quality per joule")


def write_energy(rows: list, out: Path, task: str) -> tuple[str, Path | None]:
    """energy.json (`tier_summary`) and energy.png (`plot_energy`) in the run folder; returns the printed table and
    the plot's path (None without matplotlib or without federated rows)."""
    summary = tier_summary(rows)
    (out / "energy.json").write_text(json.dumps(summary, indent=2) + "\n")
    return format_tiers(summary), plot_energy(rows, out / "energy.png", task)


def energy_summary(rows: list) -> dict:
    """A run's energy for a benchmark summary: the total estimated joules (None: not a fleet run) and
    `tier_totals`."""
    fleet = [r for r in rows if r.energy_j is not None]
    return {"energy_j": fleet[-1].energy_j if fleet else None, "tiers": tier_totals(fleet)}


def energy_cells(runs: list[dict]) -> tuple[str, str]:
    """Two table cells of a method's `energy_summary`s over seeds: the mean total joules (± sd), and the mean
    joules per device-round of each tier ("r4 12.3, r8 20.1")."""
    totals = [r["energy_j"] for r in runs if r.get("energy_j") is not None]
    if not totals:
        return "-", "-"
    per_tier: dict[str, list] = {}
    for run in runs:
        for tier, t in (run.get("tiers") or {}).items():
            if t["joules_per_device_round"] is not None:
                per_tier.setdefault(tier, []).append(t["joules_per_device_round"])
    tiers = ", ".join(f"r{tier} {sum(v) / len(v):.1f}" for tier, v in per_tier.items())
    mean = sum(totals) / len(totals)
    spread = (sum((t - mean) ** 2 for t in totals) / len(totals)) ** 0.5
    return f"{mean:.0f} ± {spread:.0f}", tiers or "-"
