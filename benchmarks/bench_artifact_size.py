"""Artifact storage per backend against the float32 base weights plus the adapters (issue target: <= 1.2x).

    .venv/bin/python benchmarks/bench_artifact_size.py --artifacts DIR

For each backend of an export folder (`hetlora export`): the files every rank shares (stored once),
each rank's own files, the total, and the ratio to (float32 base model weights + the float32 adapters
of the exported ranks: LoRA factors and head). Reads the manifest's byte counts; the base weights are
the model folder's safetensors tensors.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def base_weight_bytes(model_dir: Path) -> int:
    """float32 bytes of every tensor in the model folder's safetensors files."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "numpy") as f:
            total += sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def main() -> None:
    from edge_client.backends.artifacts import load_manifest
    from edge_client.bench.cost import rank_upload_bytes
    from hetlora.models.adapter_spec import derive_spec
    from hetlora.models.bundled import default_model_dir
    from hetlora.models.folders import model_hash

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--model", type=Path, help="the base model folder (default: all-MiniLM-L6-v2)")
    args = p.parse_args()
    manifest = load_manifest(args.artifacts)
    doc = manifest.doc
    model_dir = args.model or default_model_dir()
    if model_hash(model_dir) != doc["model_hash"]:
        sys.exit(f"{args.artifacts} was exported from another model than {model_dir}; pass --model")
    spec = derive_spec(model_dir, doc["task"], tuple(doc["targets"]), doc["num_labels"])
    base = base_weight_bytes(model_dir)
    print(f"{model_dir.name}: float32 base weights {base / 1e6:.1f} MB; batch {doc['batch']} x seq {doc['seq_len']}")
    print(f"{'backend':<11} {'ranks':<12} {'shared MB':>9} {'own MB/rank':>16} {'total MB':>9} "
          f"{'base+adapters MB':>16} {'ratio':>6}")
    for backend in sorted({a["backend"] for a in doc["artifacts"]}):
        entries = [a for a in doc["artifacts"] if a["backend"] == backend]
        uses = Counter(f["path"] for a in entries for f in a["files"].values())
        sizes = {f["path"]: f["bytes"] for a in entries for f in a["files"].values()}
        shared = sum(b for path, b in sizes.items() if uses[path] > 1)
        own = [sum(f["bytes"] for f in a["files"].values() if uses[f["path"]] == 1) for a in entries]
        reference = base + sum(rank_upload_bytes(spec, a["rank"]) for a in entries)
        total = sum(sizes.values())
        ranks = ",".join(str(a["rank"]) for a in entries)
        print(f"{backend:<11} {ranks:<12} {shared / 1e6:9.1f} {min(own) / 1e6:7.2f}-{max(own) / 1e6:<8.2f} "
              f"{total / 1e6:9.1f} {reference / 1e6:16.1f} {total / reference:6.2f}")


if __name__ == "__main__":
    main()
