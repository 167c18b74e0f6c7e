"""Runs the benchmark cells (backend x rank) and summarises each one.

Each backend runs in its own worker process (edge_client.bench.worker); ranks are interleaved across
repetitions (schedule.interleaved) and, per rank, every backend runs in turn. Each segment: `warmup`
untimed steps, then timed steps until it has at least ceil(steps / repetitions) steps and
min_seconds / repetitions seconds, inside one energy-meter window (here) and one RSS high-water window
(in the worker); device conditions (temperature, clock, throttling) are read just before and after.
A cell is the union of its segments: step times concatenated, energy windows combined (never across
different labels), peak RSS the maximum.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_client.bench.peak import fraction
from edge_client.bench.schedule import interleaved
from edge_client.bench.stats import summarize
from edge_client.device.energy import EnergyMeter, EnergyResult, combine
from edge_client.device.host import Host
from edge_client.device.sampling import BackgroundSampler
from hetlora.errors import UserError
from edge_client.device.cpu import read_cpu
from edge_client.device.thermal import read_thermal
from hetlora.output import show_progress

log = logging.getLogger("hetlora.bench")


@dataclass(frozen=True)
class Settings:
    ranks: tuple[int, ...]
    backends: tuple[str, ...]
    batch: int
    seq_len: int
    steps: int  # timed steps per cell, at least
    min_seconds: float  # timed seconds per cell, at least
    warmup: int  # untimed steps before every segment
    repetitions: int  # segments per cell, interleaved across ranks


@dataclass
class Segment:
    seconds: list[float]
    energy: EnergyResult
    peak_rss_bytes: int
    start: dict
    end: dict


@dataclass
class CellRun:
    backend: str
    rank: int
    computed_rank: int
    segments: list[Segment] = field(default_factory=list)


class RssHighWater(BackgroundSampler):
    """Highest resident set size of this process, sampled every `interval_s` while the block runs."""

    thread_name = "rss-sampler"

    def __init__(self, interval_s: float = 0.02):
        import psutil

        super().__init__(interval_s)
        self.process = psutil.Process()
        self.peak_bytes = 0

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)


def conditions(host: Host) -> dict:
    """Hottest thermal zone, current highest CPU clock and throttling state (None where unreadable)."""
    cpu = read_cpu(host)
    return {"time": time.time(), "temp_c": read_thermal(host)["max_c"], "freq_mhz": cpu["freq_mhz"],
            "throttled": cpu["throttled"], "throttle_reasons": cpu["throttle_reasons"]}


def run_segment(worker, rank: int, *, warmup: int, min_steps: int, min_seconds: float, meter: EnergyMeter,
                host: Host) -> tuple[int, Segment]:
    """One segment of `worker`'s backend at `rank`: warm-up, then the timed steps inside one energy-meter
    window, with device conditions just before and after. (computed rank, segment); UserError to skip."""
    answer = worker.request({"prepare": rank, "warmup": warmup})
    if "skip" in answer:
        raise UserError(answer["skip"])
    start = conditions(host)
    meter.start()
    timed = worker.request({"time": {"min_steps": min_steps, "min_seconds": min_seconds}})
    energy = meter.stop()
    return answer["computed_rank"], Segment(timed["seconds"], energy, timed["peak_rss_bytes"], start, conditions(host))


def run_cells(settings: Settings, open_worker: Callable[[str], object], skip_reasons: dict[str, str | None],
              meter: EnergyMeter, host: Host) -> tuple[list[CellRun], list[dict]]:
    """Every (backend, rank) cell, each backend in its own worker process (its peak RSS its own), cells
    interleaved: per repetition every rank, per rank every backend. Unavailable backends and ranks are
    skipped with the reason. A progress bar counts the segments (unless -q)."""
    from tqdm import tqdm

    skipped: list[dict] = []
    workers = {}
    for backend in settings.backends:
        try:
            if skip_reasons.get(backend):
                raise UserError(skip_reasons[backend])
            workers[backend] = open_worker(backend)
        except UserError as exc:
            skipped.append({"backend": backend, "rank": None, "reason": str(exc)})
    cells: dict[tuple[str, int], CellRun] = {}
    bar = tqdm(total=len(settings.ranks) * settings.repetitions * len(workers), desc="bench", unit="segment",
               leave=False, disable=not show_progress())
    try:
        for rep, rank in interleaved(list(settings.ranks), settings.repetitions):
            for backend, worker in workers.items():
                _one_segment(worker, rep, rank, settings, meter, host, cells, skipped)
                bar.update()
    finally:
        bar.close()
        for worker in workers.values():
            worker.close()
    order = [(b, r) for b in settings.backends for r in settings.ranks]
    return [cells[key] for key in order if key in cells], skipped


def _one_segment(worker, rep: int, rank: int, settings: Settings, meter: EnergyMeter, host: Host,
                 cells: dict, skipped: list[dict]) -> None:
    """Run one segment into `cells`, or note why the (backend, rank) cell is skipped (once)."""
    backend = worker.backend
    if any(s["backend"] == backend and s["rank"] in (rank, None) for s in skipped):
        return
    try:
        computed, segment = run_segment(worker, rank, warmup=settings.warmup,
                                        min_steps=math.ceil(settings.steps / settings.repetitions),
                                        min_seconds=settings.min_seconds / settings.repetitions, meter=meter, host=host)
    except UserError as exc:
        skipped.append({"backend": backend, "rank": rank, "reason": str(exc)})
        return
    cells.setdefault((backend, rank), CellRun(backend, rank, computed)).segments.append(segment)
    log.debug("%s r=%d repetition %d: %d steps, median %.3f s", backend, rank, rep + 1, len(segment.seconds),
              sorted(segment.seconds)[len(segment.seconds) // 2])


def cell_energy(segments: list[Segment]) -> EnergyResult:
    """The segments' windows combined; unavailable (with the reason) if they were measured differently."""
    try:
        return combine([s.energy for s in segments])
    except ValueError as exc:
        first = segments[0].energy
        return EnergyResult("unavailable", first.scope, first.source, sum(s.energy.seconds for s in segments), None,
                            sum(s.energy.sample_count for s in segments), None, note=str(exc))


def summarize_cell(run: CellRun, *, batch: int, seq_len: int, flops_per_step: float, peak_gflops: float | None,
                   upload_bytes: int, real_tokens: int | None = None) -> dict:
    """The cell's row: latency statistics, throughput, memory, energy (with its labels), GFLOPS, upload.

    tokens_per_s counts every position of the batch; real_tokens_per_s only the attended (non-pad) ones,
    `real_tokens` per step (default: all of them). peak_fraction is clamped to 1 (edge_client/bench/peak.py).
    """
    seconds = [t for s in run.segments for t in s.seconds]
    latency = summarize(seconds)
    steps = latency["n"]
    tokens = steps * batch * seq_len
    energy = cell_energy(run.segments)
    achieved = flops_per_step / latency["mean_s"] / 1e9

    def per(value, count):
        return None if value is None else value / count

    return {
        "backend": run.backend, "rank": run.rank, "computed_rank": run.computed_rank,
        "batch": batch, "seq_len": seq_len, "latency": {**latency, "samples_s": seconds},
        "tokens_per_s": batch * seq_len / latency["mean_s"],
        "real_tokens_per_s": (batch * seq_len if real_tokens is None else real_tokens) / latency["mean_s"],
        "peak_rss_mb": max(s.peak_rss_bytes for s in run.segments) / 2**20,
        "flops_per_step": flops_per_step, "achieved_gflops": achieved,
        **fraction(achieved, peak_gflops),
        "upload_bytes": upload_bytes,
        "energy": energy.to_json(),
        "joules_per_step": per(energy.joules, steps), "joules_per_token": per(energy.joules, tokens),
        "joules_above_idle_per_step": per(energy.joules_above_idle, steps),
        "conditions": {"start": run.segments[0].start, "end": run.segments[-1].end,
                       "segments": [{"start": s.start, "end": s.end} for s in run.segments]},
    }
