"""Shared fixtures: tiny random-weight model folders (BERT for classification, Llama for causal LM).

Both are real transformers models saved with `save_pretrained`, with a real tokenizer, so
every code path that loads a model folder runs unchanged on them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROJECT = Path(__file__).resolve().parents[1]
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


def hetlora_export(model_dir, out, *flags: str) -> subprocess.CompletedProcess:
    """`hetlora export` of `model_dir` into `out` in its own process with the default output, as a user runs it:
    ExecuTorch (XNNPACK) and, where onnxruntime-training is installed, ONNX (ARTIFACT_BACKENDS), batch
    ARTIFACT_BATCH. Returns the finished process (what it printed)."""
    cmd = [sys.executable, "-m", "hetlora.cli", "export", "--model", str(model_dir), "--batch-size",
           str(ARTIFACT_BATCH), "--backends", ",".join(ARTIFACT_BACKENDS), "--out", str(out), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT, timeout=1800)  # a hang guard
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_bert_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """`hetlora export` of the tiny BERT, once per session: ranks 2 and 4, ARTIFACT_BACKENDS (ExecuTorch with
    XNNPACK, ONNX), batch 4 x seq_len 16, three labels, and the server's defaults (the model type's LoRA targets,
    lora_alpha 16), so `hetlora serve` runs can use it too. (folder, finished process): the artifacts serve every
    test that trains from them (tiny_artifacts), the output the test of what the command prints."""
    labels = tmp_path_factory.mktemp("artifact-labels") / "labels.txt"
    labels.write_text("\n".join(ARTIFACT_LABELS) + "\n")
    out = tmp_path_factory.mktemp("tiny-artifacts")
    return out, hetlora_export(tiny_bert_dir, out, "--task", "classification", "--labels", str(labels),
                               "--ranks", ",".join(map(str, ARTIFACT_RANKS)), "--seq-len", str(ARTIFACT_SEQ))


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_export) -> Path:
    """The folder of the session's tiny BERT export (tiny_export)."""
    return tiny_export[0]


@pytest.fixture(scope="session")
def tiny_llama_artifacts(tmp_path_factory, tiny_llama_dir) -> Path:
    """`hetlora export --task causal-lm` of the tiny Llama, once per session: rank 4, ExecuTorch (XNNPACK) and
    ONNX, batch 4 x seq_len 64 (room for SmolLM2's chat template and a short exchange), LoRA on q_proj and
    v_proj, lora_alpha 16."""
    out = tmp_path_factory.mktemp("tiny-llama-artifacts")
    hetlora_export(tiny_llama_dir, out, "--task", "causal-lm", "--ranks", str(LLAMA_ARTIFACT_RANK),
                   "--seq-len", str(LLAMA_ARTIFACT_SEQ), "--targets", ",".join(LLAMA_TARGETS))
    return out


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


EXPORTING_FIXTURES = {"tiny_export", "tiny_artifacts", "tiny_llama_artifacts"}


def pytest_collection_modifyitems(items):
    """An integration test (real processes end to end) is always slow too, and so is a test that needs exported
    artifacts (the session's exports take minutes): the fast tier leaves them out."""
    for item in items:
        exports = EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ()))
        if (item.get_closest_marker("integration") or exports) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


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
