"""Export every (rank, backend) artifact of one base model and task, then write manifest.json."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from edge_client.lora import set_rank
from exporter import EXECUTORCH_DELEGATES
from hetlora.models.adapter_spec import derive_spec
from hetlora.models.folders import default_targets, model_hash
from exporter.manifest import artifact_entry, build_manifest, write_manifest
from exporter.training_graph import build_training_graph, example_inputs, trainable_names
from hetlora.errors import UserError
from exporter.onnx_export import export_onnx
from exporter.executorch_export import export_executorch

log = logging.getLogger(__name__)
BACKENDS = ("executorch", "onnx")


@dataclass(frozen=True)
class ExportRequest:
    model_dir: Path
    task: str
    ranks: tuple[int, ...]
    batch: int
    seq_len: int
    backends: tuple[str, ...]
    out: Path
    targets: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    num_labels: int | None = None
    lora_alpha: float = 16.0
    executorch_delegate: str = EXECUTORCH_DELEGATES[0]


def check_request(req: ExportRequest) -> None:
    if not req.ranks or any(r < 1 for r in req.ranks):
        raise UserError(f"--ranks must be positive integers, got {list(req.ranks)}")
    if req.batch < 1 or req.seq_len < 2:
        raise UserError(f"--batch-size must be >= 1 and --seq-len >= 2, got {req.batch} and {req.seq_len}")
    unknown = [b for b in req.backends if b not in BACKENDS]
    if unknown or not req.backends:
        raise UserError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if req.task == "classification" and not (req.labels or req.num_labels):
        raise UserError("classification needs --labels FILE or --num-labels N")


def export_all(req: ExportRequest, *, progress: bool = True) -> dict:
    """Export the artifacts of `req` into `req.out` and return the manifest document."""
    check_request(req)
    targets = tuple(req.targets or default_targets(req.model_dir))
    num_labels = len(req.labels) if req.labels else req.num_labels
    spec = derive_spec(req.model_dir, req.task, targets, num_labels)
    req.out.mkdir(parents=True, exist_ok=True)
    graph = build_training_graph(req.model_dir, req.task, max(req.ranks), targets, req.lora_alpha, num_labels)
    vocab = graph.model.config.vocab_size
    what = f"{req.model_dir.name} ({req.task})"
    entries = []
    jobs = [(rank, backend) for rank in sorted(set(req.ranks)) for backend in req.backends]
    bar = tqdm(jobs, desc="export", unit="artifact", disable=not progress)
    for rank, backend in bar:
        bar.set_postfix_str(f"rank {rank} {backend}")
        set_rank(graph.model, rank, req.lora_alpha)
        inputs = example_inputs(req.task, rank, req.batch, req.seq_len, vocab)
        t0 = time.perf_counter()
        if backend == "onnx":
            files = export_onnx(graph, inputs, req.out / "onnx" / f"r{rank}", what=what, first=rank == jobs[0][0])
            extra = {}
        else:
            files = export_executorch(graph, inputs, req.out / "executorch" / f"r{rank}.pte",
                                      delegate=req.executorch_delegate, what=what, first=rank == jobs[0][0])
            extra = {"delegate": req.executorch_delegate}
        seconds = time.perf_counter() - t0
        entries.append(artifact_entry(req.out, backend, rank, files, seconds, **extra))
        log.debug("exported rank %d %s in %.1f s", rank, backend, seconds)
    doc = build_manifest(model_hash=model_hash(req.model_dir), spec_fingerprint=spec.fingerprint, task=req.task,
                         labels=list(req.labels) if req.labels else None, num_labels=num_labels, targets=targets,
                         lora_alpha=req.lora_alpha, batch=req.batch, seq_len=req.seq_len,
                         trainable=trainable_names(graph), artifacts=entries)
    write_manifest(req.out, doc)
    return doc
