"""The onnx and executorch backends against the torch backend (the reference), on tiny real models.

Classification trains from the session's tiny BERT artifacts (conftest.tiny_artifacts: ranks 2 and 4),
the causal LM from the tiny Llama's (conftest.tiny_llama_artifacts: rank 4, seq_len 64) on chat rows, the
loss on the responses only; the "executorch-portable" variant (ExecuTorch's CPU kernels, no XNNPACK) is
the session's export of each at rank 4 (conftest.tiny_portable_artifacts, tiny_llama_portable_artifacts).
The exported shape is larger than the rounds use, so padding of batches and of ranks is exercised everywhere.
Every round runs the plan's optimiser in the client: AdamW with a warm-up + cosine schedule, weight decay and
a separate head learning rate.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_client.backends import make_trainer
from edge_client.backends.artifact_trainer import padded_tail_mask
from edge_client.backends.select import choose_backend
from edge_client.data import Examples
from edge_client.lora import load_adapter, tail_mask, tail_penalty
from hetlora.models.adapter_spec import derive_spec
from hetlora.models.folders import default_targets
from edge_client.objective import batch_loss
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import Adapter
from hetlora.errors import UserError
from edge_client.objective import IGNORE
from tests.helpers.adapters import random_adapter
from tests.conftest import (ARTIFACT_BATCH as ART_BATCH, ARTIFACT_LABELS, ARTIFACT_SEQ, LLAMA_ARTIFACT_SEQ,
                            LLAMA_TARGETS, PORTABLE_RANK, needs_onnx_training)

ONNX = pytest.param("onnx", marks=needs_onnx_training)

ART_RANK = PORTABLE_RANK  # the rank of every artifact these tests train from
ALPHA = 16.0
LABELS = list(ARTIFACT_LABELS)
SENTENCES = ["how do I activate my new card", "my card payment was declined at the shop",
             "what is the exchange rate for euros", "federated learning keeps private data on the device",
             "the quick brown fox jumps over the lazy dog"]
SETUPS = {"classification": ("tiny_bert_dir", "tiny_artifacts", "tiny_portable_artifacts"),
          "causal-lm": ("tiny_llama_dir", "tiny_llama_artifacts", "tiny_llama_portable_artifacts")}
# (model folder, artifacts folder, ExecuTorch-portable artifacts folder) fixtures: conftest's session exports
EXPORT_SEQ = {"classification": ARTIFACT_SEQ, "causal-lm": LLAMA_ARTIFACT_SEQ}  # chat rows need the template's room
ROUND_SEQ = {"classification": 12, "causal-lm": 56}
ADAMW = dict(optimizer="adamw", lr=0.01, head_lr=0.02, weight_decay=0.1, schedule="cosine", warmup_steps=2)


def examples_for(task: str) -> Examples:
    texts = tuple(f"{s} {i}" for i, s in enumerate(SENTENCES * 2))
    if task == "classification":
        return Examples(task, texts, tuple(i % len(LABELS) for i in range(len(texts))))
    prompts = tuple(f"what would you say about {i}?" for i in range(len(texts)))
    return Examples(task, prompts, responses=texts, chat=True)


@pytest.fixture(scope="module", params=[pytest.param(task, marks=[pytest.mark.slow, pytest.mark.exports(*names[1:])])
                                        for task, names in sorted(SETUPS.items())])
def setup(request):
    """(task, model_dir, targets, labels, {variant: artifacts folder})."""
    task = request.param
    model_dir, artifacts, portable = (request.getfixturevalue(name) for name in SETUPS[task])
    labels = LABELS if task == "classification" else None
    targets = default_targets(model_dir) if task == "classification" else LLAMA_TARGETS
    return task, model_dir, targets, labels, {"default": artifacts, "executorch-portable": portable}


def trainers(setup, variant: str):
    """(torch reference, trainer of `variant`: onnx, executorch (XNNPACK) or executorch-portable)."""
    task, model_dir, targets, labels, folders = setup
    kwargs = dict(model_dir=model_dir, task=task, labels=labels, targets=targets, lora_alpha=ALPHA)
    backend, folder = ("executorch", folders[variant]) if variant in folders else (variant, folders["default"])
    return make_trainer("torch", **kwargs), make_trainer(backend, artifacts_dir=folder, **kwargs)


def spec_of(setup):
    task, model_dir, targets, labels, _ = setup
    return derive_spec(model_dir, task, targets, len(labels) if labels else None)


@pytest.mark.parametrize("backend", [ONNX, "executorch", "executorch-portable"])
def test_first_step_loss_and_gradients_equal_torch(setup, backend):
    task = setup[0]
    reference, trainer = trainers(setup, backend)
    rank, lam, gamma = 3, 0.3, 0.5
    start = random_adapter(spec_of(setup), rank, seed=1)
    batch = next(iter(trainer_batches(trainer, task)))

    model = reference.model
    load_adapter(model, start, reference.dense, ALPHA)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n or n in reference.dense}
    for p in params.values():
        p.requires_grad_(True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = batch_loss(logits, batch["labels"], task) + lam * tail_penalty(model, tail_mask(rank, gamma))
    expected.backward()

    engine = trainer.engine_for(rank)
    trainer.load(start)
    loss, _, _, n_targets = engine.forward_backward(
        trainer.inputs(batch, rank, padded_tail_mask(rank, engine.rank, gamma), lam))
    assert loss == pytest.approx(float(expected), abs=1e-4)
    assert n_targets == int(targets_of(batch, task).sum())
    if task == "causal-lm":  # chat rows: the template and the prompt are no targets
        assert 0 < n_targets < int(batch["attention_mask"][:, 1:].sum())
    grads = {name: g.numpy() for name, g in engine.gradients().items()}
    assert set(grads) == {"model." + n for n in params}
    for name, p in params.items():
        got = grads["model." + name]
        if "lora_A" in name:
            assert not got[rank:].any(), "a rank silenced by the keep mask got a gradient"
            got = got[:rank]
        elif "lora_B" in name:
            assert not got[:, rank:].any(), "a rank silenced by the keep mask got a gradient"
            got = got[:, :rank]
        want = p.grad.numpy()
        assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want) + 1e-7, name


def trainer_batches(trainer, task):
    from edge_client.data import make_batches

    return make_batches(trainer.encode(examples_for(task), ROUND_SEQ[task]), 3, seed=0)


def targets_of(batch, task: str) -> torch.Tensor:
    """Where the batch has targets: labels not IGNORE (a causal LM's shifted: position t predicts t + 1)."""
    labels = batch["labels"][:, 1:] if task == "causal-lm" else batch["labels"]
    return labels != IGNORE


def assert_same_adapter(got: Adapter, want: Adapter, atol: float) -> None:
    assert got.rank == want.rank and set(got.lora) == set(want.lora) and set(got.dense) == set(want.dense)
    for name, (a, b) in want.lora.items():
        np.testing.assert_allclose(got.lora[name][0], a, atol=atol, err_msg=name)
        np.testing.assert_allclose(got.lora[name][1], b, atol=atol, err_msg=name)
    for name, t in want.dense.items():
        np.testing.assert_allclose(got.dense[name], t, atol=atol, err_msg=name)


@pytest.mark.parametrize("backend", [ONNX, "executorch", "executorch-portable"])
def test_round_with_self_pruning_matches_torch(setup, backend):
    """Six AdamW steps at rank 3 in an artifact of rank 4 (padding silenced by the keep mask), then pruning to 2.

    Tolerance: 2e-5 absolute on every wire tensor (float32 kernels of different libraries).
    """
    task = setup[0]
    reference, trainer = trainers(setup, backend)
    start = random_adapter(spec_of(setup), 3, seed=2)
    cfg = TrainingSettings(steps=6, batch_size=3, seq_len=ROUND_SEQ[task], prune_lambda=0.5, prune_gamma=0.7,
                           min_rank=1, lora_alpha=ALPHA, **ADAMW)
    want = reference.train_round(start, examples_for(task), cfg, rank=3, mode="hetlora")
    got = trainer.train_round(start, examples_for(task), cfg, rank=3, mode="hetlora")
    assert want.rank_after == got.rank_after == 2
    assert got.tail_before == pytest.approx(want.tail_before, rel=1e-5)
    assert got.tail_after == pytest.approx(want.tail_after, rel=1e-4)
    assert got.loss_before == pytest.approx(want.loss_before, abs=1e-4)
    assert got.loss_after == pytest.approx(want.loss_after, abs=1e-4)
    assert_same_adapter(got.adapter, want.adapter, atol=2e-5)
    current = trainer.read()
    for name in current:
        if name.endswith("lora_A"):
            assert not current[name][2:].any(), "pruned or padded ranks must hold exact zeros"
        elif name.endswith("lora_B"):
            assert not current[name][:, 2:].any(), "pruned or padded ranks must hold exact zeros"


@pytest.mark.parametrize("backend", [ONNX, "executorch"])
def test_adamw_with_a_schedule_on_a_fixed_batch_equals_torch(setup, backend):
    """One fixed batch, eight steps of AdamW (warm-up 2, then cosine; weight decay; the head at its own lr):
    the loss of every step and the round's update equal torch's to 1e-4."""
    task = setup[0]
    reference, trainer = trainers(setup, backend)
    fixed = examples_for(task).subset(range(ART_BATCH))
    start = random_adapter(spec_of(setup), ART_RANK, seed=7)
    cfg = TrainingSettings(steps=8, batch_size=ART_BATCH, seq_len=EXPORT_SEQ[task], lora_alpha=ALPHA, **ADAMW)
    losses = {"want": [], "got": []}
    want = reference.train_round(start, fixed, cfg, rank=ART_RANK, on_step=lambda i, loss: losses["want"].append(loss))
    got = trainer.train_round(start, fixed, cfg, rank=ART_RANK, on_step=lambda i, loss: losses["got"].append(loss))
    assert len(losses["got"]) == 8
    np.testing.assert_allclose(losses["got"], losses["want"], rtol=0, atol=1e-4)
    assert losses["want"][-1] < losses["want"][0] - 0.01, "the round must learn for the comparison to mean anything"
    for name, (a0, b0) in start.lora.items():
        (a, b), (wa, wb) = got.adapter.lora[name], want.adapter.lora[name]
        np.testing.assert_allclose(a - a0, wa - a0, rtol=0, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(b - b0, wb - b0, rtol=0, atol=1e-4, err_msg=name)
    for name, d0 in start.dense.items():
        np.testing.assert_allclose(got.adapter.dense[name] - d0, want.adapter.dense[name] - d0, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["executorch", "executorch-portable"])
def test_plain_round_without_pruning_keeps_rank(setup, backend):
    """Full rank, two steps: every trainable weight's update must reach the program (XNNPACK may hold
    only frozen weights as static)."""
    task = setup[0]
    reference, trainer = trainers(setup, backend)
    start = random_adapter(spec_of(setup), ART_RANK, seed=3)
    cfg = TrainingSettings(steps=2, batch_size=ART_BATCH, seq_len=EXPORT_SEQ[task], lora_alpha=ALPHA, **ADAMW)
    want = reference.train_round(start, examples_for(task), cfg, rank=ART_RANK)
    got = trainer.train_round(start, examples_for(task), cfg, rank=ART_RANK)
    assert got.rank_after == ART_RANK and got.tail_before == got.tail_after == 0.0
    assert_same_adapter(got.adapter, want.adapter, atol=2e-5)


@needs_onnx_training
def test_user_errors(setup):
    task, model_dir, targets, labels, folders = setup
    out = folders["default"]
    _, trainer = trainers(setup, "executorch")
    start = random_adapter(spec_of(setup), 2, seed=4)
    with pytest.raises(UserError, match="--backend torch"):
        trainer.train_round(start, examples_for(task), TrainingSettings(), rank=2, indices=[0, 1], mode="plora")
    exported = EXPORT_SEQ[task]
    with pytest.raises(UserError, match=f"batch 4 x seq_len {exported}"):
        trainer.train_round(start, examples_for(task), TrainingSettings(seq_len=2 * exported), rank=2)
    big = random_adapter(spec_of(setup), 8, seed=5)
    with pytest.raises(UserError, match="no executorch artifact for rank 8"):
        trainer.train_round(big, examples_for(task), TrainingSettings(), rank=8)
    with pytest.raises(UserError, match="unknown optimizer 'lion'"):
        trainer.train_round(start, examples_for(task),
                            TrainingSettings(optimizer="lion", batch_size=2, seq_len=ROUND_SEQ[task]), rank=2)
    with pytest.raises(UserError, match="--artifacts"):
        make_trainer("onnx", model_dir=model_dir, task=task, labels=labels, targets=targets, lora_alpha=ALPHA)
    with pytest.raises(UserError, match="lora_alpha"):
        make_trainer("onnx", model_dir=model_dir, task=task, labels=labels, targets=targets, lora_alpha=ALPHA * 2,
                     artifacts_dir=out)


@pytest.mark.parametrize("backend", [ONNX, "executorch"])
def test_artifact_trainers_head_statistics_equal_torch(setup, backend):
    """Round-0 statistics (the frozen features) equal the torch trainer's."""
    task = setup[0]
    reference, trainer = trainers(setup, backend)
    if task != "classification":
        with pytest.raises(UserError, match="classification runs only"):
            trainer.frozen_features(examples_for(task), ROUND_SEQ[task])
        return
    (want, want_labels), (got, got_labels) = (t.frozen_features(examples_for(task), 12) for t in (reference, trainer))
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@needs_onnx_training
@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_artifact_sha256_is_verified(setup, tmp_path, damage):
    task, model_dir, targets, labels, folders = setup
    copy = tmp_path / "artifacts"
    shutil.copytree(folders["default"], copy)
    target = copy / "onnx" / f"r{ART_RANK}" / "training_model.onnx"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    with pytest.raises(UserError, match="training_model.onnx"):
        make_trainer("onnx", model_dir=model_dir, task=task, labels=labels, targets=targets, lora_alpha=ALPHA,
                     artifacts_dir=copy, rank=ART_RANK)


@pytest.mark.parametrize("machine, termux, have, expected", [
    ("x86_64", False, {"onnxruntime.training", "torch"}, "onnx"),
    ("x86_64", False, {"torch"}, "torch"),
    ("aarch64", False, {"torch", "executorch"}, "torch"),
    ("aarch64", True, {"torch", "executorch"}, "torch"),
])
def test_auto_backend_choice(machine, termux, have, expected):
    backend, reason = choose_backend(has_artifacts=True, machine=machine, termux=termux, have=have.__contains__)
    assert backend == expected and reason


def test_auto_without_torch_is_a_user_error():
    with pytest.raises(UserError, match="no training backend without torch"):
        choose_backend(has_artifacts=True, machine="aarch64", termux=False, have={"executorch"}.__contains__)


def test_executorch_backend_itself_needs_torch():
    """Why `auto` cannot offer ExecuTorch without torch: the program's inputs, outputs and the client's optimiser
    are torch tensors, so the engine imports torch first."""
    blocker = ("import sys\n"
               "class Blocked:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'torch':\n"
               "            raise ImportError('blocked: ' + name)\n"
               "sys.meta_path.insert(0, Blocked())\n"
               "from edge_client.backends.executorch_backend import ExecuTorchEngine\n"
               "ExecuTorchEngine(None)\n")
    out = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True)
    assert out.returncode != 0 and "blocked: torch" in out.stderr


def test_auto_without_artifacts_is_torch():
    assert choose_backend(has_artifacts=False, machine="x86_64", termux=False, have=lambda m: True)[0] == "torch"


def test_default_executorch_artifact_is_xnnpack_delegated(setup):
    from edge_client.backends.artifacts import load_manifest

    for variant, delegated in [("default", True), ("executorch-portable", False)]:
        manifest = load_manifest(setup[4][variant])
        entry = next(a for a in manifest.doc["artifacts"] if a["backend"] == "executorch")
        assert entry["delegate"] == ("xnnpack" if delegated else "portable")
        program = manifest.artifact("executorch", ART_RANK).files["program"].read_bytes()
        assert (b"XnnpackBackend" in program) == delegated


@pytest.mark.parametrize("backend", ["executorch", ONNX])
def test_ranks_share_one_frozen_weights_file(tiny_bert_dir, tiny_artifacts, backend):
    """Frozen base weights live once per backend (executorch/frozen_weights.ptd, onnx/frozen_weights.safetensors),
    in no rank's own files; each rank trains from them."""
    from safetensors.numpy import load_file

    from edge_client.backends.artifacts import load_manifest

    entries = [e for e in load_manifest(tiny_artifacts).doc["artifacts"] if e["backend"] == backend]
    assert len(entries) == 2 and len({e["files"]["weights"]["path"] for e in entries}) == 1
    weights = (tiny_artifacts / entries[0]["files"]["weights"]["path"]).read_bytes()
    embedding = load_file(str(tiny_bert_dir / "model.safetensors"))["embeddings.word_embeddings.weight"]
    probe = embedding[1000].tobytes()  # one row of the largest frozen tensor
    assert probe in weights
    for entry in entries:
        for role, f in entry["files"].items():
            if role != "weights":
                own = (tiny_artifacts / f["path"]).read_bytes()
                assert probe not in own and len(own) < len(weights) / 4, role
    kwargs = dict(model_dir=tiny_bert_dir, task="classification", labels=LABELS, lora_alpha=ALPHA)
    reference, trainer = make_trainer("torch", **kwargs), make_trainer(backend, artifacts_dir=tiny_artifacts, **kwargs)
    start = random_adapter(derive_spec(tiny_bert_dir, "classification", default_targets(tiny_bert_dir), 3), 2, seed=6)
    cfg = TrainingSettings(steps=2, batch_size=2, seq_len=8, lora_alpha=ALPHA, **ADAMW)
    want = reference.train_round(start, examples_for("classification"), cfg, rank=2)
    got = trainer.train_round(start, examples_for("classification"), cfg, rank=2)
    assert trainer.engine.rank == 2
    assert_same_adapter(got.adapter, want.adapter, atol=2e-5)


def test_executorch_runtime_failure_is_a_user_error(setup, tmp_path):
    """A weights file the runtime cannot read (sha256 passed, e.g. from another exporter version) -> one line."""
    import dataclasses

    from edge_client.backends.artifacts import load_manifest
    from edge_client.backends.executorch_backend import ExecuTorchEngine

    artifact = load_manifest(setup[4]["default"]).artifact("executorch", ART_RANK)
    unreadable = tmp_path / "frozen_weights.ptd"
    unreadable.write_bytes(b"not a flat tensor file" * 10)
    with pytest.raises(UserError, match=r"ExecuTorch runtime failed to load r4\.pte: .*--backend torch"):
        ExecuTorchEngine(dataclasses.replace(artifact, files={**artifact.files, "weights": unreadable}))


@pytest.mark.parametrize("backend", [ONNX, "executorch"])
def test_a_rank_change_frees_the_old_program_before_loading_the_new(tiny_bert_dir, tiny_artifacts, backend,
                                                                   monkeypatch):
    """Peak memory on a tier change is one program, not two: the old engine is gone, and its freed memory handed
    back to the system, when the new one opens."""
    import weakref

    from edge_client.backends import artifact_trainer

    trainer = make_trainer(backend, model_dir=tiny_bert_dir, task="classification", labels=LABELS,
                           targets=default_targets(tiny_bert_dir), lora_alpha=ALPHA, artifacts_dir=tiny_artifacts)
    old = weakref.ref(trainer.engine_for(2))
    opened, events = trainer.open_engine, []

    def open_engine(artifact):
        events.append(("open", old() is not None))
        return opened(artifact)

    trainer.open_engine = open_engine
    monkeypatch.setattr(artifact_trainer, "return_freed_memory", lambda: events.append(("trim", old() is not None)))
    assert trainer.engine_for(4).rank == 4
    assert events == [("trim", False), ("open", False)]
