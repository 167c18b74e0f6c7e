"""Runs the benchmark cells (backend x rank) and summarises each one.

Per backend, ranks run interleaved across repetitions (schedule.interleaved). Each segment:
`warmup` untimed steps, then timed steps until it has at least ceil(steps / repetitions) steps and
min_seconds / repetitions seconds, inside one energy-meter window and one RSS high-water window;
device conditions (temperature, clock, throttling) are read just before and after the timed steps.
A cell is the union of its segments: step times concatenated, energy windows combined (never across
different labels), peak RSS the maximum.
"""

from __future__ import annotations

import gc
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
    from edge_client.device.cpu import read_cpu
    from edge_client.device.thermal import read_thermal

    cpu = read_cpu(host)
    return {"time": time.time(), "temp_c": read_thermal(host)["max_c"], "freq_mhz": cpu["freq_mhz"],
            "throttled": cpu["throttled"], "throttle_reasons": cpu["throttle_reasons"]}


def run_segment(step: Callable[[], object], *, warmup: int, min_steps: int, min_seconds: float,
                meter: EnergyMeter, host: Host) -> Segment:
    for _ in range(warmup):
        step()
    start = conditions(host)
    seconds: list[float] = []
    with RssHighWater() as rss:
        meter.start()
        began = time.perf_counter()
        while len(seconds) < min_steps or time.perf_counter() - began < min_seconds:
            t = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - t)
        energy = meter.stop()
    return Segment(seconds, energy, rss.peak_bytes, start, conditions(host))


def run_backend(stepper, settings: Settings, meter: EnergyMeter, host: Host,
                on_segment: Callable[[str], None] = lambda text: None) -> tuple[list[CellRun], list[dict]]:
    """Every rank of one backend, interleaved; ranks it cannot serve are skipped with the reason.
    `on_segment` hears one line per finished (or skipped) segment."""
    cells: dict[int, CellRun] = {}
    skipped: dict[int, str] = {}
    min_steps = math.ceil(settings.steps / settings.repetitions)
    min_seconds = settings.min_seconds / settings.repetitions
    for rep, rank in interleaved(list(settings.ranks), settings.repetitions):
        if rank in skipped:
            continue
        try:
            step, computed = stepper.prepare(rank)
        except UserError as exc:
            skipped[rank] = str(exc)
            on_segment(f"{stepper.backend} r={rank} skipped")
            continue
        segment = run_segment(step, warmup=settings.warmup, min_steps=min_steps, min_seconds=min_seconds,
                              meter=meter, host=host)
        cell = cells.setdefault(rank, CellRun(stepper.backend, rank, computed))
        cell.segments.append(segment)
        line = f"{stepper.backend} r={rank} repetition {rep + 1}: {len(segment.seconds)} steps, " \
               f"median {sorted(segment.seconds)[len(segment.seconds) // 2]:.3f} s"
        log.debug(line)
        on_segment(line)
    return [cells[r] for r in settings.ranks if r in cells], \
        [{"backend": stepper.backend, "rank": r, "reason": why} for r, why in skipped.items()]


def run_cells(settings: Settings, open_stepper: Callable[[str], object], skip_reasons: dict[str, str | None],
              meter: EnergyMeter, host: Host) -> tuple[list[CellRun], list[dict]]:
    """All backends in turn (each one's model released before the next loads); skipped ones with reasons.
    A progress bar counts the segments (unless -q)."""
    from tqdm import tqdm

    from hetlora.output import show_progress

    runs: list[CellRun] = []
    skipped: list[dict] = []
    per_backend = len(settings.ranks) * settings.repetitions
    bar = tqdm(total=len(settings.backends) * per_backend, desc="bench", unit="segment", leave=False,
               disable=not show_progress())
    for backend in settings.backends:
        done = bar.n
        try:
            if skip_reasons.get(backend):
                raise UserError(skip_reasons[backend])
            stepper = open_stepper(backend)
        except UserError as exc:
            skipped.append({"backend": backend, "rank": None, "reason": str(exc)})
            bar.update(per_backend)
            continue
        backend_runs, backend_skipped = run_backend(
            stepper, settings, meter, host, on_segment=lambda text: (bar.set_postfix_str(text), bar.update()))
        bar.update(done + per_backend - bar.n)
        runs += backend_runs
        skipped += backend_skipped
        del stepper
        gc.collect()
    bar.close()
    return runs, skipped


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
