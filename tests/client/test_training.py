"""The torch backend against dense references: wire round trip, determinism, self-pruning, Select-N-Fold."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from hetlora.protocol.adapter_ops import select
from edge_client.data import Examples
from edge_client.lora import lora_layers
from hetlora.models.adapter_spec import derive_spec
from hetlora.protocol.settings import TrainingSettings
from edge_client.training import TorchTrainer
from hetlora.protocol.wire import Adapter, decode, encode
from tests.helpers.adapters import random_adapter

LABELS = ["card", "rate", "other"]
TEXTS = ["how do I activate my new card", "my card payment was declined at the shop",
         "what is the exchange rate for euros", "the quick brown fox jumps over the lazy dog",
         "federated learning keeps private data on the device", "card arrived broken",
         "euro rate today", "nothing to see here"]
CLS = Examples("classification", tuple(TEXTS), (0, 0, 1, 2, 2, 0, 1, 2))
CFG = TrainingSettings(steps=4, batch_size=4, seq_len=16, lr=1e-2, seed=3)


def start_adapter(spec, rank: int, seed: int, b_scale: float = 0.05):
    """A global adapter with non-zero A and B (as after some rounds), LoRA factors only."""
    return random_adapter(spec, rank, seed, b_scale=b_scale, dense=False)


@pytest.fixture(scope="module")
def spec(tiny_bert_dir):
    return derive_spec(tiny_bert_dir, "classification", num_labels=len(LABELS))


@pytest.fixture(scope="module")
def trainer(tiny_bert_dir):
    return TorchTrainer(tiny_bert_dir, "classification", LABELS)


def logits(trainer, texts=TEXTS):
    enc = trainer.tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return trainer.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


@pytest.mark.slow
def test_effective_weights_equal_those_rebuilt_from_the_wire(trainer, spec, tiny_bert_dir):
    result = trainer.train_round(start_adapter(spec, 8, 0), CLS, CFG, rank=8)
    wire = decode(encode(result.adapter))
    for name, layer in lora_layers(trainer.model).items():
        a, b = wire.lora[name]
        assert torch.equal((layer.lora_B * layer.scale) @ layer.lora_A, torch.from_numpy(b) @ torch.from_numpy(a))
    for name, p in trainer.dense.items():
        assert torch.equal(p, torch.from_numpy(wire.dense[name]))
    trained = logits(trainer)
    fresh = TorchTrainer(tiny_bert_dir, "classification", LABELS)
    fresh._load(wire)
    torch.testing.assert_close(logits(fresh), trained, rtol=0, atol=1e-6)
    assert result.n_samples == len(CLS) and result.steps == CFG.steps


@pytest.mark.slow
def test_same_seed_gives_identical_adapters_and_another_seed_does_not(trainer, spec):
    start = start_adapter(spec, 4, 1)
    cfg = replace(CFG, dropout=True)
    first = trainer.train_round(start, CLS, cfg, rank=4).adapter
    second = trainer.train_round(start, CLS, cfg, rank=4).adapter
    other = trainer.train_round(start, CLS, replace(cfg, seed=4), rank=4).adapter
    for name, (a, b) in first.lora.items():
        assert np.array_equal(a, second.lora[name][0]) and np.array_equal(b, second.lora[name][1])
    assert not all(np.array_equal(b, other.lora[n][1]) for n, (_, b) in first.lora.items())


def sharpened(model_dir, path, task: str):
    """A copy of a tiny model re-initialised with std 0.5. At the default std 0.02 every text gets almost the
    same [CLS] feature (0.4% spread) and a frozen LM head bounds the logits to about +-0.6, so no short run
    can overfit; the copy keeps the architecture and tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    config.initializer_range = 0.5
    (AutoModelForCausalLM if task == "causal-lm" else AutoModel).from_config(config).save_pretrained(path)
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, path / f.name)
    return path


@pytest.mark.slow
def test_classification_loss_falls_on_a_tiny_overfit_set(tiny_bert_dir, tmp_path):
    model_dir = sharpened(tiny_bert_dir, tmp_path, "classification")
    trainer = TorchTrainer(model_dir, "classification", LABELS)
    spec = derive_spec(model_dir, "classification", num_labels=len(LABELS))
    result = trainer.train_round(start_adapter(spec, 4, 2), CLS, replace(CFG, steps=30, lr=2e-2), rank=4)
    assert result.loss_after < 0.5 * result.loss_before


@pytest.mark.slow
def test_causal_lm_loss_falls_on_a_tiny_overfit_set(tiny_llama_dir, tmp_path):
    model_dir = sharpened(tiny_llama_dir, tmp_path, "causal-lm")
    trainer = TorchTrainer(model_dir, "causal-lm")
    spec = derive_spec(model_dir, "causal-lm")
    data = Examples("causal-lm", ("", "", "how do I"), responses=(TEXTS[0], TEXTS[3], "activate my new card"))
    result = trainer.train_round(start_adapter(spec, 4, 3), data, replace(CFG, steps=30, lr=2e-2, batch_size=2),
                                 rank=4)
    assert result.loss_after < 0.5 * result.loss_before
    assert result.adapter.dense == {}


PRUNE = replace(CFG, steps=6, lr=1e-2, prune_lambda=5.0, prune_gamma=0.5, min_rank=2)


def tail_norm(adapter: Adapter, p: int) -> float:
    return sum(float(np.linalg.norm(b[:, p:]) * np.linalg.norm(a[p:])) for a, b in adapter.lora.values())


@pytest.mark.slow
def test_strong_regulariser_shrinks_the_tail_and_prunes_to_floor_gamma_r(trainer, spec):
    start = start_adapter(spec, 8, 4, b_scale=0.5)
    result = trainer.train_round(start, CLS, PRUNE, rank=8, mode="hetlora")
    assert result.tail_after < result.tail_before
    assert (result.rank_before, result.rank_after, result.adapter.rank) == (8, 4, 4)
    assert result.rank_after == result.adapter.rank == 4
    unpruned = trainer.train_round(start, CLS, replace(PRUNE, prune_lambda=0.0), rank=8, mode="hetlora").adapter
    assert tail_norm(unpruned, 4) > tail_norm(start, 4) * 0.5  # without the regulariser the tail stays


@pytest.mark.slow
@pytest.mark.parametrize("change,expected_rank", [
    ({"prune_gamma": 1.0}, 8),
    ({"prune_lambda": 0.0}, 8),
    ({"min_rank": 6}, 6),
    ({"prune_gamma": 0.2}, 2),
])
def test_pruning_rule_gamma_lambda_and_min_rank(trainer, spec, change, expected_rank):
    result = trainer.train_round(start_adapter(spec, 8, 4, b_scale=0.5), CLS, replace(PRUNE, **change), rank=8,
                                 mode="hetlora")
    assert result.rank_after == result.adapter.rank == expected_rank


@pytest.mark.slow
def test_plain_mode_never_prunes(trainer, spec):
    result = trainer.train_round(start_adapter(spec, 8, 4, b_scale=0.5), CLS, PRUNE, rank=8, mode="plain")
    assert result.rank_after == 8


def test_select_n_fold_reproduces_the_unfolded_forward_pass(trainer, spec):
    start = start_adapter(spec, 8, 5, b_scale=0.3)
    start.dense = {n: np.full(tuple(s), 0.01, np.float32) for n, s in spec.dense.items()}
    indices = [6, 1, 3]
    trainer._load(start)
    reference = logits(trainer)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in lora_layers(trainer.model).items()}
    with trainer._folded(start, indices):
        trainer._load(select(start, indices))
        assert not torch.equal(next(iter(lora_layers(trainer.model).values())).base.weight, next(iter(w0.values())))
        torch.testing.assert_close(logits(trainer), reference, rtol=0, atol=1e-5)
    for name, layer in lora_layers(trainer.model).items():
        assert torch.equal(layer.base.weight, w0[name])


def test_plora_round_uploads_only_the_selected_components_and_restores_w0(trainer, spec):
    start = start_adapter(spec, 8, 6, b_scale=0.3)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in lora_layers(trainer.model).items()}
    indices = [5, 0]
    frozen = trainer.train_round(start, CLS, replace(CFG, lr=0.0), rank=2, indices=indices, mode="plora").adapter
    for name, (a, b) in frozen.lora.items():
        assert np.array_equal(a, start.lora[name][0][indices]) and np.array_equal(b, start.lora[name][1][:, indices])
    result = trainer.train_round(start, CLS, CFG, rank=2, indices=indices, mode="plora")
    assert result.adapter.rank == 2
    assert not np.array_equal(result.adapter.lora[next(iter(start.lora))][0], frozen.lora[next(iter(start.lora))][0])
    for name, layer in lora_layers(trainer.model).items():
        assert torch.equal(layer.base.weight, w0[name])


def test_trimmed_batches_give_the_full_width_loss(trainer, spec):
    from edge_client.data import make_batches, trim_batch
    from edge_client.objective import batch_loss

    trainer._load(start_adapter(spec, 4, seed=5))
    trainer.model.eval()
    for batch in make_batches(trainer.encode(CLS, 32), 4, seed=0):
        trimmed = trim_batch(batch)
        assert trimmed["input_ids"].shape[1] < 32
        with torch.no_grad():
            full = batch_loss(trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"], "classification")
            cut = batch_loss(trainer.model(input_ids=trimmed["input_ids"],
                                           attention_mask=trimmed["attention_mask"]).logits,
                             trimmed["labels"], "classification")
        torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)


def test_length_grouped_batches_cover_every_row_once_and_hold_similar_lengths():
    from edge_client.data import Encoded, make_batches

    rng = np.random.default_rng(0)
    n, width = 300, 40
    lengths = rng.integers(2, width, n)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    encoded = Encoded("classification", np.arange(n)[:, None] * mask, mask, np.arange(n), lengths)
    plain = make_batches(encoded, 16, seed=1)
    grouped = make_batches(encoded, 16, seed=1, group_by_length=True)
    assert sorted(int(i) for b in grouped for i, lab in zip(b["labels"], b["labels"]) if lab >= 0) == list(range(n))

    def padding(batches):
        return sum(int(b["attention_mask"].sum(1).max()) * 16 - int(b["attention_mask"].sum()) for b in batches)

    assert padding(grouped) < padding(plain) / 3
    again = make_batches(encoded, 16, seed=1, group_by_length=True)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(grouped, again))


@pytest.mark.parametrize("step,expected", [(0, 1 / 3), (2, 1.0), (3, 1.0), (4, 0.5 * (1 + np.cos(np.pi / 7))), (10, 0.0)])
def test_cosine_schedule_warms_up_then_decays_to_zero(step, expected):
    from edge_client.training import lr_factor

    cfg = TrainingSettings(steps=10, schedule="cosine", warmup_steps=3)
    assert lr_factor(step, cfg) == pytest.approx(expected)
    assert lr_factor(step, replace(cfg, schedule="constant")) == 1.0


def test_head_and_factors_train_at_their_own_learning_rates(trainer, spec):
    """With a zero LoRA lr only the head moves; with a zero head lr the head stays put."""
    start = start_adapter(spec, 4, seed=6)
    head_only = trainer.train_round(start, CLS, replace(CFG, lr=0.0, head_lr=1e-2), rank=4).adapter
    factors_only = trainer.train_round(start, CLS, replace(CFG, lr=1e-2, head_lr=0.0), rank=4).adapter
    initial_head = trainer._initial_dense
    for name, (a, b) in head_only.lora.items():
        np.testing.assert_array_equal(a, start.lora[name][0])
        np.testing.assert_array_equal(b, start.lora[name][1])
    assert any(not np.array_equal(head_only.dense[n], initial_head[n].numpy()) for n in head_only.dense)
    for n, t in factors_only.dense.items():
        np.testing.assert_array_equal(t, initial_head[n].numpy())
    assert any(not np.array_equal(a, start.lora[name][0]) for name, (a, _) in factors_only.lora.items())


@pytest.mark.parametrize("steps, epochs, batch, n_rows, expected", [
    (10, None, 4, 216, 10),    # the chat demo's round: a quarter of its 40 trained rows, not 64 of them
    (20, None, 16, 1000, 64),  # the classifier's: capped at EVAL_ROWS
    (2, None, 4, 100, 4),      # at least one batch
    (10, None, 4, 6, 6),       # at most the data
    (None, 2, 4, 40, 20),      # epochs: a quarter of epochs x the data
])
def test_the_evaluation_set_is_a_quarter_of_the_trained_rows_within_bounds(steps, epochs, batch, n_rows, expected):
    from edge_client.data import Encoded
    from edge_client.training import evaluation_batches, evaluation_rows

    cfg = TrainingSettings(steps=steps, epochs=epochs, batch_size=batch, seq_len=8)
    assert evaluation_rows(n_rows, cfg) == expected
    encoded = Encoded("classification", np.arange(n_rows * 8).reshape(n_rows, 8), np.ones((n_rows, 8), np.int64),
                      np.arange(n_rows), np.full(n_rows, 8))
    labels = [int(t) for b in evaluation_batches(encoded, cfg) for t in b["labels"] if t != -100]
    assert sorted(labels) == sorted(np.random.default_rng(0).permutation(n_rows)[:expected].tolist())
