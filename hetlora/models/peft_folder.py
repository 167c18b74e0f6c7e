"""A PEFT export that `AutoPeftModelFor...from_pretrained(folder)` loads with no further arguments.

The folder holds the adapter (hetlora.protocol.peft_format), the tokenizer, and for classification a
`base/` folder: the base model's files (hard links, copies across file systems) with a
`config.json` that records `num_labels`, `id2label` and `label2id`, since transformers builds the
head from the base config. `base_model_name_or_path` is the path the user gives (`base_path`),
by default the absolute path of `<out>/base` (classification) or of the base model folder (causal LM), so
the folder loads from any working directory (a relative path that misses makes transformers try the hub). Transformers' Auto classes build the model type's own pooling:
for a mean-pooling model (hetlora.models.pooling) load the adapter onto hetlora.models.task_model.load_task_model
with PeftModel.from_pretrained instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hetlora.errors import UserError
from hetlora.models.task_model import load_tokenizer
from hetlora.protocol.atomic import write_bytes
from hetlora.protocol.peft_format import save_peft
from hetlora.protocol.wire import Adapter, decode

BASE = "base"


def labelled_config(model_dir: Path, labels: list[str]) -> dict:
    """The base model's config.json with the classification labels added."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config | {"num_labels": len(labels), "id2label": {str(i): name for i, name in enumerate(labels)},
                     "label2id": {name: i for i, name in enumerate(labels)}}


def link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_labelled_base(model_dir: Path, out: Path, labels: list[str]) -> Path:
    """`out/base`: the base model's top-level files with a labelled config.json."""
    base = out / BASE
    base.mkdir(parents=True, exist_ok=True)
    for src in Path(model_dir).iterdir():
        if src.is_file() and src.name != "config.json":
            link_or_copy(src, base / src.name)
    (base / "config.json").write_text(json.dumps(labelled_config(model_dir, labels), indent=2) + "\n")
    return base


def export_peft(adapter: Adapter, out: str | os.PathLike, *, model_dir: str | os.PathLike, task: str,
                labels: list[str] | None = None, base_path: str | None = None) -> Path:
    """Write the PEFT folder `out` for `adapter` (wire form) trained on `model_dir`; returns `out`."""
    out = Path(out)
    if task == "classification":
        heads = [t for t in adapter.dense.values() if t.ndim == 2]
        if len(heads) != 1:
            raise UserError("a classification adapter carries one linear head; this one has "
                            f"{len(heads)} two-dimensional dense tensors")
        if not labels or len(labels) != heads[0].shape[0]:
            raise UserError(f"the head has {heads[0].shape[0]} classes: pass the run's label list (--labels FILE)")
        write_labelled_base(Path(model_dir), out, list(labels))
        default_base = str((out / BASE).resolve())
    else:
        default_base = str(Path(model_dir).resolve())
    save_peft(adapter, out, task, base_model=base_path or default_base)
    load_tokenizer(model_dir).save_pretrained(str(out))
    return out


def save_result(data: bytes, folder: Path, *, model_dir: str | os.PathLike, task: str,
                labels: list[str] | None) -> tuple[Path, Path]:
    """A run's result in `folder`: `global.safetensors` (wire bytes `data`) and the PEFT folder `peft/`."""
    wire, peft = folder / "global.safetensors", folder / "peft"
    write_bytes(wire, data)
    export_peft(decode(data), peft, model_dir=model_dir, task=task, labels=labels)
    return wire, peft
