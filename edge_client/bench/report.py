"""Bench outputs: the versioned JSON document, a flat CSV (one row per cell), PNG plots and a table.

Energy figures always travel with their labels (status, scope, source, model); the energy plot
draws one line per (backend, label set), so an estimate and a measurement never share a line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hetlora.plots import line_plot

SCHEMA, VERSION = "hetlora-bench", 1
CSV_COLUMNS = (
    "backend", "rank", "computed_rank", "batch", "seq_len", "steps", "p50_s", "p90_s", "p99_s", "mean_s", "std_s",
    "tokens_per_s", "peak_rss_mb", "flops_per_step", "achieved_gflops", "peak_fraction", "upload_bytes",
    "energy_status", "energy_scope", "energy_source", "energy_model", "energy_sample_rate_hz", "energy_sample_count",
    "joules_per_step", "joules_per_token", "joules_above_idle_per_step", "idle_w",
    "temp_start_c", "temp_end_c", "freq_start_mhz", "freq_end_mhz", "throttled_start", "throttled_end",
)


def csv_row(cell: dict) -> dict:
    lat, energy, cond = cell["latency"], cell["energy"], cell["conditions"]
    return {
        **{k: cell[k] for k in ("backend", "rank", "computed_rank", "batch", "seq_len", "tokens_per_s", "peak_rss_mb",
                                "flops_per_step", "achieved_gflops", "peak_fraction", "upload_bytes",
                                "joules_per_step", "joules_per_token", "joules_above_idle_per_step")},
        "steps": lat["n"], **{k: lat[k] for k in ("p50_s", "p90_s", "p99_s", "mean_s", "std_s")},
        "energy_status": energy["energy_status"], "energy_scope": energy["scope"], "energy_source": energy["source"],
        "energy_model": energy["model"], "energy_sample_rate_hz": energy["sample_rate_hz"],
        "energy_sample_count": energy["sample_count"], "idle_w": energy["idle_w"],
        "temp_start_c": cond["start"]["temp_c"], "temp_end_c": cond["end"]["temp_c"],
        "freq_start_mhz": cond["start"]["freq_mhz"], "freq_end_mhz": cond["end"]["freq_mhz"],
        "throttled_start": cond["start"]["throttled"], "throttled_end": cond["end"]["throttled"],
    }


def write_csv(path: Path, cells: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for cell in cells:
            writer.writerow({k: "" if v is None else v for k, v in csv_row(cell).items()})
    return path


def energy_label(energy: dict) -> str:
    """The label set of an energy figure, e.g. "estimated: estimate/package (tdp-fraction)"."""
    if energy["source"] is None:
        return energy["energy_status"]
    model = f" ({energy['model']})" if energy.get("model") else ""
    return f"{energy['energy_status']}: {energy['source']}/{energy['scope']}{model}"


def write_plots(out: Path, cells: list[dict]) -> dict:
    """latency_vs_rank.png and energy_vs_rank.png; {"latency": path | None, "energy": path | None, "note"}."""
    latency: dict[str, tuple[list, list]] = {}
    energy: dict[str, tuple[list, list]] = {}
    for cell in cells:
        xs, (ys,) = latency.setdefault(cell["backend"], ([], [[]]))
        xs.append(cell["rank"])
        ys.append(cell["latency"]["p50_s"])
        if cell["joules_per_step"] is not None:
            xs, (ys,) = energy.setdefault(f"{cell['backend']} [{energy_label(cell['energy'])}]", ([], [[]]))
            xs.append(cell["rank"])
            ys.append(cell["joules_per_step"])
    result = {"latency": None, "energy": None, "note": None}
    if latency:
        path = line_plot(out / "latency_vs_rank.png", latency, panels=[("p50 step latency (s)", 0)],
                         xlabel="LoRA rank", title="Training step latency vs rank")
        result["latency"] = str(path) if path else None
    if energy:
        path = line_plot(out / "energy_vs_rank.png", energy, panels=[("energy per step (J)", 0)],
                         xlabel="LoRA rank", title="Energy per training step vs rank")
        result["energy"] = str(path) if path else None
    else:
        result["note"] = "no energy figure: energy is unavailable on this device, so no energy plot"
    return result


def write_json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(doc: dict) -> str:
    """The printed summary: one line per cell, the energy label set below, then the skipped backends."""
    head = (f"{'backend':<10} {'rank':>4} {'n':>4} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'mean s':>7} {'std s':>6} "
            f"{'tok/s':>7} {'RSS MB':>7} {'GFLOPS':>7} {'%peak':>6} {'upload KB':>9} {'J/step':>7} {'mJ/tok':>7} "
            f"{'energy':<11} {'T start/end C':>13}")
    lines = [head, "-" * len(head)]
    labels = []
    for c in doc["cells"]:
        lat, cond = c["latency"], c["conditions"]
        label = energy_label(c["energy"])
        labels += [label] if label not in labels else []
        temps = f"{_fmt(cond['start']['temp_c'], '.0f')}/{_fmt(cond['end']['temp_c'], '.0f')}"
        rank = f"{c['rank']}" + ("" if c["computed_rank"] == c["rank"] else f"({c['computed_rank']})")
        lines.append(
            f"{c['backend']:<10} {rank:>4} {lat['n']:>4} {lat['p50_s']:7.3f} {lat['p90_s']:7.3f} {lat['p99_s']:7.3f} "
            f"{lat['mean_s']:7.3f} {lat['std_s']:6.3f} {c['tokens_per_s']:7.0f} {c['peak_rss_mb']:7.0f} "
            f"{c['achieved_gflops']:7.1f} {_fmt(c['peak_fraction'] and 100 * c['peak_fraction'], '6.1f'):>6} "
            f"{c['upload_bytes'] / 1024:9.1f} {_fmt(c['joules_per_step'], '7.2f'):>7} "
            f"{_fmt(c['joules_per_token'] and 1000 * c['joules_per_token'], '7.2f'):>7} "
            f"{c['energy']['energy_status']:<11} {temps:>13}")
    peak = doc["peak_gflops"]
    lines.append(f"matmul peak {_fmt(peak['value'], '.1f')} GFLOPS ({peak['source']}); batch {doc['settings']['batch']}"
                 f" x seq_len {doc['settings']['seq_len']}; rank(R): artifact of rank R computes rank r")
    lines += [f"energy {label}" for label in labels]
    notes = {c["energy"]["note"] for c in doc["cells"] if c["energy"].get("note")}
    lines += [f"energy note: {n}" for n in sorted(notes)]
    for s in doc["skipped"]:
        where = s["backend"] + (f" r={s['rank']}" if s["rank"] is not None else "")
        lines.append(f"skipped {where}: {s['reason']}")
    return "\n".join(lines)
