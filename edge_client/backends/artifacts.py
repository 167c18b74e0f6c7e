"""The artifact folder a device trains from: `manifest.json` plus per-rank files, verified by sha256.

manifest.json (format "hetlora-artifacts", version 2):
  model_hash, spec_fingerprint, task, labels | null, num_labels, targets, lora_alpha,
  batch, seq_len, inputs, outputs,
  parameters: {artifact parameter name: wire name}   (`<module>.lora_A|lora_B` or a dense name)
  artifacts: [{backend, rank, delegate (executorch), export_seconds, files: {role: {path, bytes, sha256}}}]
An artifact computes the loss and gradients only; the optimiser runs on the device (version 1 artifacts
carried one: re-export them).
Paths are relative to the folder. Pure Python: the exporter writes it, devices read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hetlora.errors import UserError
from hetlora.protocol.settings import TrainingSettings

FORMAT = "hetlora-artifacts"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """One backend's files for one rank tier (absolute paths) and the shapes its inputs must have."""

    backend: str
    rank: int
    files: dict[str, Path]
    parameter_names: tuple[str, ...]
    batch: int
    seq_len: int
    task: str

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        labels = (self.batch,) if self.task == "classification" else (self.batch, self.seq_len)
        return {"input_ids": (self.batch, self.seq_len), "attention_mask": (self.batch, self.seq_len),
                "labels": labels, "keep_mask": (self.rank,), "tail_mask": (self.rank,),
                "prune_lambda": (), "lora_scale": ()}


@dataclass(frozen=True)
class Manifest:
    folder: Path
    doc: dict

    @property
    def batch(self) -> int:
        return int(self.doc["batch"])

    @property
    def seq_len(self) -> int:
        return int(self.doc["seq_len"])

    @property
    def parameters(self) -> dict[str, str]:
        """Artifact parameter name -> wire name."""
        return dict(self.doc["parameters"])

    def ranks(self, backend: str) -> list[int]:
        return sorted(int(a["rank"]) for a in self.doc["artifacts"] if a["backend"] == backend)

    def require(self, backend: str) -> None:
        """UserError when the folder holds no artifact of `backend`."""
        if not self.ranks(backend):
            raise UserError(f"{self.folder} has no {backend} artifacts; export them with "
                            f"`hetlora export --backends {backend}` or pick another --backend")

    def artifact(self, backend: str, rank: int) -> Artifact:
        """The smallest exported rank >= `rank` for `backend` (keep masks cover the ranks in between)."""
        fitting = [r for r in self.ranks(backend) if r >= rank]
        if not fitting:
            raise UserError(f"{self.folder} has no {backend} artifact for rank {rank} (exported: "
                            f"{self.ranks(backend) or 'none'}); export that rank with "
                            f"`hetlora export --ranks ... --backends {backend}` or use --backend torch")
        entry = next(a for a in self.doc["artifacts"] if a["backend"] == backend and int(a["rank"]) == fitting[0])
        return Artifact(backend, int(entry["rank"]),
                        {role: self.folder / f["path"] for role, f in entry["files"].items()},
                        tuple(self.parameters), self.batch, self.seq_len, self.doc["task"])

    def verify(self, artifact: Artifact) -> None:
        """Check every file of `artifact` exists with the manifest's size and sha256, else UserError naming it."""
        entry = next(a for a in self.doc["artifacts"]
                     if a["backend"] == artifact.backend and int(a["rank"]) == artifact.rank)
        for role, f in entry["files"].items():
            path = self.folder / f["path"]
            if not path.is_file():
                raise UserError(f"artifact file {path} is missing; copy the whole export folder to the device again")
            if path.stat().st_size != int(f["bytes"]) or sha256_file(path) != f["sha256"]:
                raise UserError(f"artifact file {path} does not match manifest.json (size or sha256 differs): it is "
                                "corrupted or from another export; copy the export folder to the device again")

    def check_compatible(self, *, model_hash: str | None, task: str, targets, lora_alpha: float) -> None:
        """The artifacts must be exported from the client's base model, task, targets and LoRA alpha."""
        problems = []
        if model_hash is not None and self.doc["model_hash"] != model_hash:
            problems.append("base model (model hash differs)")
        if self.doc["task"] != task:
            problems.append(f"task ({self.doc['task']} != {task})")
        if targets is not None and tuple(self.doc["targets"]) != tuple(targets):
            problems.append(f"LoRA targets ({self.doc['targets']} != {list(targets)})")
        if float(self.doc["lora_alpha"]) != float(lora_alpha):
            problems.append(f"lora_alpha ({self.doc['lora_alpha']} != {lora_alpha})")
        if problems:
            raise UserError(f"the artifacts in {self.folder} were exported for another setup: {', '.join(problems)}; "
                            "re-run `hetlora export` for this model and run")


    def check_run(self, run: dict, overrides: dict | None = None) -> None:
        """UserError (one line) when the server's `run` (GET /v1/run) is not one these artifacts serve: another task,
        base model or spec fingerprint, or local training settings (the run's, with the client's `overrides`)
        larger than the exported batch x seq_len. Checked before the client registers."""
        problems = [f"{what} ({self.doc.get(key)} != {run[key]})" for key, what in
                    (("task", "task"), ("model_hash", "base model hash"), ("spec_fingerprint", "spec fingerprint"))
                    if run.get(key) is not None and self.doc.get(key) != run[key]]
        if problems:
            raise UserError(f"the artifacts in {self.folder} were exported for another run than the server's: "
                            f"{', '.join(problems)}; re-run `hetlora export` with the server's model, labels and "
                            "targets")
        try:
            cfg = TrainingSettings.from_json(run.get("training") or {}).updated(overrides or {})
        except ValueError:
            return  # the server's settings are checked (one line) where each round's plan arrives
        if cfg.batch_size > self.batch or cfg.seq_len > self.seq_len:
            raise UserError(f"the artifacts in {self.folder} were exported for batch {self.batch} x seq_len "
                            f"{self.seq_len}; the run trains {cfg.batch_size} x {cfg.seq_len}: pass --batch-size "
                            f"{min(cfg.batch_size, self.batch)} --seq-len {min(cfg.seq_len, self.seq_len)} or "
                            "re-export larger")

    def request_rank(self, backend: str, run_ranks, wanted: int | None) -> int:
        """The rank a client training on these artifacts asks the server for: `wanted` (--rank) when it was
        exported, else the largest exported rank up to the run's largest (else the
        smallest above it). The server assigns at most the requested
        rank (rounded down to a run rank), which an exported rank >= it then serves; UserError naming the exported
        ranks when none fits."""
        exported = self.ranks(backend)
        if wanted is not None:
            if wanted not in exported:
                raise UserError(f"--rank {wanted}: the {backend} artifacts in {self.folder} were exported at rank(s) "
                                f"{', '.join(map(str, exported))}; ask for one of them")
            return wanted
        usable = [r for r in exported if r >= min(run_ranks)]
        if not usable:
            raise UserError(f"the {backend} artifacts in {self.folder} were exported at rank(s) "
                            f"{', '.join(map(str, exported))}, all below the run's ranks "
                            f"{', '.join(map(str, run_ranks))}; export one of the run's ranks with `hetlora export "
                            f"--ranks ...`")
        within = [r for r in usable if r <= max(run_ranks)]
        return max(within) if within else min(usable)


def load_manifest(folder: str | os.PathLike) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} has no {MANIFEST}; pass the folder written by `hetlora export --out DIR`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}); copy the export folder again") from None
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest; re-export with this version")
    return Manifest(folder, doc)
