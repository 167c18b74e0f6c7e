"""Build `manifest.json` for an export folder (format: edge_client.backends.artifacts)."""

from __future__ import annotations

import json
from pathlib import Path

from edge_client.backends.artifacts import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from exporter.training_graph import INPUT_NAMES, MODEL_PREFIX, OUTPUT_NAMES


def wire_name(parameter: str) -> str:
    """Artifact parameter `model.<module>.lora_A` -> wire `<module>.lora_A`; dense `model.<name>` -> `<name>`."""
    return parameter[len(MODEL_PREFIX):] if parameter.startswith(MODEL_PREFIX) else parameter


def file_entry(folder: Path, path: Path) -> dict:
    return {"path": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def artifact_entry(folder: Path, backend: str, rank: int, files: dict[str, Path], seconds: float, **extra) -> dict:
    """One artifact's manifest entry; `extra`: backend-specific keys (executorch: delegate)."""
    return {"backend": backend, "rank": rank, **extra, "export_seconds": round(seconds, 2),
            "files": {role: file_entry(folder, p) for role, p in files.items()}}


def build_manifest(*, model_hash: str, spec_fingerprint: str, task: str, labels: list[str] | None,
                   num_labels: int | None, targets, lora_alpha: float, batch: int, seq_len: int,
                   trainable: list[str], artifacts: list[dict]) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_hash": model_hash, "spec_fingerprint": spec_fingerprint, "task": task,
        "labels": labels, "num_labels": num_labels, "targets": list(targets), "lora_alpha": lora_alpha,
        "batch": batch, "seq_len": seq_len, "inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES),
        "parameters": {name: wire_name(name) for name in trainable},
        "artifacts": artifacts,
    }


def write_manifest(folder: Path, doc: dict) -> Path:
    path = folder / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    tmp.replace(path)
    return path
