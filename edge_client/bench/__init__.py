"""`hetlora bench`: per-rank step latency, throughput, memory, energy, achieved GFLOPS and upload size.

stats.py     percentiles and the latency summary of a list of step times (pure)
schedule.py  the interleaved order in which (rank, repetition) segments run (pure)
cost.py      FLOPs of one LoRA training step and upload bytes of a rank (pure arithmetic)
steppers.py  one timed training step per backend (torch, onnx, executorch) or the reason it is skipped
runner.py    runs the cells, interleaved across ranks and backends: energy meter, device conditions
worker.py    one backend in its own process (JSON lines): warm-up, timed steps, its own RSS high-water
report.py    the versioned JSON document, CSV, PNG plots and the printed table
"""
