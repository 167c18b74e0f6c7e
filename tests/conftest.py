"""Shared fixtures: tiny random-weight model folders (BERT for classification, Llama for causal LM).

Both are real transformers models saved with `save_pretrained`, with a real tokenizer, so
every code path that loads a model folder runs unchanged on them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from hetlora.models.bundled import default_model_dir as find

    return find()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer BERT (hidden 32) with the MiniLM WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The installed SmolLM2-135M-Instruct folder (the causal-lm default, converted by `make install`)."""
    from hetlora.models.bundled import default_model_dir as find

    return find("causal-lm")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer Llama (hidden 32) with SmolLM2's real tokenizer and chat template: the 135M model's
    stand-in, the same code paths at a fraction of the cost."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    tokenizer.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_mean_bert_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny BERT as a sentence-transformers checkpoint that declares mean pooling (like all-MiniLM-L6-v2)."""
    import json

    path = tmp_path_factory.mktemp("tiny-mean-bert")
    shutil.copytree(tiny_bert_dir, path, dirs_exist_ok=True)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                               "pooling_mode_mean_tokens": True}))
    return path


ARTIFACT_LABELS = ("card", "transfer", "rate")
ARTIFACT_RANKS, ARTIFACT_BATCH, ARTIFACT_SEQ = (2, 4), 4, 16
LLAMA_ARTIFACT_RANK, LLAMA_ARTIFACT_SEQ, LLAMA_TARGETS = 4, 64, ("q_proj", "v_proj")


def _has_onnx_training() -> bool:
    try:
        return importlib.util.find_spec("onnxruntime.training") is not None
    except ModuleNotFoundError:  # no onnxruntime at all
        return False


# onnxruntime-training is the one optional platform part of the test environment: it has no Linux aarch64 wheel
# (pyproject.toml's export extra). ExecuTorch and everything else the tests import are hard dependencies.
HAS_ONNX_TRAINING = _has_onnx_training()
needs_onnx_training = pytest.mark.skipif(not HAS_ONNX_TRAINING, reason="onnxruntime-training is not installed: it "
                                         "has no wheel for this platform (x86_64 only)")
ARTIFACT_BACKENDS = ("executorch", "onnx") if HAS_ONNX_TRAINING else ("executorch",)


PORTABLE_RANK = 4  # the rank of the ExecuTorch-portable exports (tests/client/test_backends.py)
EXPORTS = ("tiny_export", "tiny_llama_artifacts", "tiny_portable_artifacts", "tiny_llama_portable_artifacts")
EXPORTS_NEEDED = pytest.StashKey[list]()


def export_arguments(name: str, labels: Path) -> tuple[str, list[str]]:
    """(model folder fixture, `hetlora export` flags besides --model and --out) of each session export: batch
    ARTIFACT_BATCH; ExecuTorch (XNNPACK) and, where onnxruntime-training is installed, ONNX (ARTIFACT_BACKENDS),
    or ExecuTorch on its CPU kernels alone ("portable", rank PORTABLE_RANK); the tiny BERT for classification with
    ARTIFACT_LABELS, the tiny Llama for causal LM; the model type's LoRA targets (the server's default) for the
    BERT, LLAMA_TARGETS for the Llama; lora_alpha 16."""
    bert = ["--task", "classification", "--labels", str(labels), "--seq-len", str(ARTIFACT_SEQ)]
    llama = ["--task", "causal-lm", "--seq-len", str(LLAMA_ARTIFACT_SEQ), "--targets", ",".join(LLAMA_TARGETS)]
    both = ["--backends", ",".join(ARTIFACT_BACKENDS)]
    portable = ["--backends", "executorch", "--executorch-delegate", "portable", "--ranks", str(PORTABLE_RANK)]
    model, flags = {"tiny_export": ("tiny_bert_dir", [*bert, *both, "--ranks", ",".join(map(str, ARTIFACT_RANKS))]),
                    "tiny_llama_artifacts": ("tiny_llama_dir", [*llama, *both, "--ranks", str(LLAMA_ARTIFACT_RANK)]),
                    "tiny_portable_artifacts": ("tiny_bert_dir", [*bert, *portable]),
                    "tiny_llama_portable_artifacts": ("tiny_llama_dir", [*llama, *portable])}[name]
    return model, ["--batch-size", str(ARTIFACT_BATCH), *flags]


@pytest.fixture(scope="session", autouse=True)
def exports(request, tmp_path_factory):
    """The session's exports (tests.helpers.exports.Exports): those its tests need start before the first test."""
    from tests.helpers.exports import Exports

    labels = tmp_path_factory.mktemp("artifact-labels") / "labels.txt"
    labels.write_text("\n".join(ARTIFACT_LABELS) + "\n")

    def prepare(name: str) -> tuple[Path, list[str]]:
        model, flags = export_arguments(name, labels)
        out = tmp_path_factory.mktemp(name.replace("_", "-"))
        return out, ["--model", str(request.getfixturevalue(model)), "--out", str(out), *flags]

    jobs = Exports(prepare)
    for name in request.config.stash.get(EXPORTS_NEEDED, []):
        jobs.start(name)
    yield jobs
    jobs.close()


@pytest.fixture(scope="session")
def tiny_export(exports) -> tuple[Path, subprocess.CompletedProcess]:
    """`hetlora export` of the tiny BERT in its own process with the default output, as a user runs it: ranks 2
    and 4, both backends, batch 4 x seq_len 16, three labels and the server's defaults, so `hetlora serve` runs
    can use it too. (folder, finished process): the artifacts serve every test that trains from them
    (tiny_artifacts), the output the test of what the command prints."""
    return exports.result("tiny_export")


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_export) -> Path:
    """The folder of the session's tiny BERT export (tiny_export)."""
    return tiny_export[0]


@pytest.fixture(scope="session")
def tiny_llama_artifacts(exports) -> Path:
    """`hetlora export --task causal-lm` of the tiny Llama: rank 4, both backends, batch 4 x seq_len 64 (room for
    SmolLM2's chat template and a short exchange), LoRA on q_proj and v_proj."""
    return exports.result("tiny_llama_artifacts")[0]


@pytest.fixture(scope="session")
def tiny_portable_artifacts(exports) -> Path:
    """The tiny BERT's ExecuTorch export on ExecuTorch's CPU kernels alone (no XNNPACK), at rank PORTABLE_RANK."""
    return exports.result("tiny_portable_artifacts")[0]


@pytest.fixture(scope="session")
def tiny_llama_portable_artifacts(exports) -> Path:
    """The tiny Llama's ExecuTorch export on ExecuTorch's CPU kernels alone (no XNNPACK), at rank PORTABLE_RANK."""
    return exports.result("tiny_llama_portable_artifacts")[0]


@pytest.fixture(scope="session")
def spec(tiny_bert_dir):
    """The tiny BERT's adapter spec for a 3-label classification run with LoRA on query and value
    (tests.helpers.server's LABELS and TARGETS), the spec of every server test's run."""
    from hetlora.models.adapter_spec import derive_spec
    from tests.helpers.server import LABELS, TARGETS

    return derive_spec(tiny_bert_dir, "classification", TARGETS, num_labels=len(LABELS))


@pytest.fixture(scope="session")
def labels_file(tmp_path_factory) -> Path:
    """A JSON labels file of ARTIFACT_LABELS, the labels of the exported artifacts and of the end-to-end runs."""
    import json

    path = tmp_path_factory.mktemp("labels") / "labels.json"
    path.write_text(json.dumps(list(ARTIFACT_LABELS)))
    return path


@pytest.fixture()
def task_identity():
    """What a ServerApp process has set when it builds Flower messages: its run, node (the SuperLink's, 1) and
    task. Flower test modules use it with `pytestmark = pytest.mark.usefixtures("task_identity")`."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


@pytest.fixture(scope="session")
def run_config(spec) -> dict:
    """The run config (GET /v1/run) of tests.helpers.server's default server config."""
    from tests.helpers.server import make_config

    return make_config(spec).run_config()


def pytest_configure(config):
    config.addinivalue_line("markers", "exports(*fixtures): the session exports (conftest.EXPORTS) a test takes by "
                                       "request.getfixturevalue, beside those among its fixtures")


def needed_exports(item) -> set[str]:
    """The session exports `item` uses: among its fixtures or marked (tiny_artifacts is tiny_export's folder)."""
    marked = {name for mark in item.iter_markers("exports") for name in mark.args}
    names = set(getattr(item, "fixturenames", ())) | marked
    return {"tiny_export" if name == "tiny_artifacts" else name for name in names} & set(EXPORTS)


def pytest_collection_modifyitems(items):
    """An integration test (real processes end to end) is always slow too, and so is a test that needs exported
    artifacts (the session's exports take minutes): the fast tier leaves them out. The modules that need exports
    run last, in their own order, so the exports started with the session (`exports`) run beside the others."""
    late = set()
    for item in items:
        exports = needed_exports(item)
        if exports:
            late.add(item.path)
        if (item.get_closest_marker("integration") or exports) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.path in late)


def pytest_collection_finish(session):
    """The exports the selected tests need, in the order of their first use."""
    needed = [name for item in session.items for name in sorted(needed_exports(item))]
    session.config.stash[EXPORTS_NEEDED] = list(dict.fromkeys(needed))


@pytest.fixture(scope="session")
def five_label_model(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny BERT saved with a trained-looking 5-label classification head (runs in the tests have 3 labels)."""
    from transformers import BertForSequenceClassification

    path = tmp_path_factory.mktemp("five-labels")
    BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=5).save_pretrained(path)
    for f in tiny_bert_dir.iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special")):
            shutil.copy(f, path / f.name)
    return path
