"""Evaluation of a global adapter on a test set: accuracy and macro-F1, or perplexity.

The adapter is merged into the base weights (W = W0 + B_wire @ A_wire, the wire format's exact
meaning), so evaluation runs the plain transformers model with no LoRA overhead. Batches are
sorted by length and trimmed to their longest row (padding is masked, so results equal the
fixed-length batches); no gradients.
"""

from __future__ import annotations

import numpy as np
import torch

from edge_client.data import EncodingCache, Examples, trimmed_batches
from hetlora.models.task_model import dense_parameter_names, load_task_model, load_tokenizer
from edge_client.objective import loss_sum_and_count, model_loss_sum_and_count
from hetlora.protocol.wire import Adapter
from hetlora.errors import UserError


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The fraction of predictions equal to the truth (scikit-learn's accuracy_score; the `evaluate` extra)."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in y_true or y_pred of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c) (scikit-learn's
    f1_score, average="macro"; the `evaluate` extra)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", zero_division=0.0)) if len(y_true) else 0.0


class Evaluator:
    """A base task model kept in memory; `evaluate` merges one adapter at a time into it."""

    def __init__(self, model_dir, task: str, labels: list[str] | None = None, pooling: str | None = None):
        torch.manual_seed(0)
        self.task = task
        self.labels = labels
        self.model = load_task_model(model_dir, task, len(labels) if labels else None, pooling=pooling).eval()
        self.dense_names = dense_parameter_names(self.model, task)
        self.tokenizer = load_tokenizer(model_dir)
        self.encode = EncodingCache(self.tokenizer)
        self._w0: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def merge(self, adapter: Adapter) -> None:
        """Set every adapted weight to W0 + B @ A and the dense tensors to the adapter's."""
        missing = [n for n in self.dense_names if n not in adapter.dense]
        if missing:
            raise UserError(f"the adapter has no {missing[0]!r}: a classification adapter must carry its head")
        modules = dict(self.model.named_modules())
        for name in adapter.lora:
            if not isinstance(modules.get(name), torch.nn.Linear):
                raise UserError(f"the adapter's module {name!r} is not a linear layer of this model; "
                                "use the base model the adapter was trained on")
        for name in set(self._w0) | set(adapter.lora):
            weight = modules[name].weight
            w0 = self._w0.setdefault(name, weight.detach().clone())
            if name in adapter.lora:
                a, b = adapter.lora[name]
                weight.copy_(w0 + torch.from_numpy(np.asarray(b)) @ torch.from_numpy(np.asarray(a)))
            else:
                weight.copy_(w0)
        params = dict(self.model.named_parameters())
        for name in self.dense_names:
            params[name].copy_(torch.from_numpy(np.asarray(adapter.dense[name])))

    @torch.no_grad()
    def evaluate(self, adapter: Adapter, examples: Examples, *, seq_len: int = 64, batch_size: int = 128) -> dict:
        """classification: accuracy, macro_f1, loss; causal-lm: nll (token mean on target tokens), perplexity."""
        if examples.task != self.task:
            raise UserError(f"test examples are for {examples.task!r} but the model is set up for {self.task!r}")
        self.merge(adapter)
        encoded = self.encode(examples, seq_len)
        total, count = 0.0, 0
        predictions = np.zeros(len(encoded), dtype=np.int64)
        for rows, batch in trimmed_batches(encoded, batch_size):
            if self.task == "classification":
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                s, c = loss_sum_and_count(logits, batch["labels"], self.task)
                predictions[rows] = logits.argmax(-1).numpy()
            else:
                s, c = model_loss_sum_and_count(self.model, batch, self.task)
            total, count = total + float(s), count + int(c)
        nll = total / max(count, 1)
        if self.task == "causal-lm":
            return {"task": self.task, "n": len(encoded), "tokens": count, "nll": nll, "perplexity": float(np.exp(nll))}
        truth = encoded.labels
        return {"task": self.task, "n": len(encoded), "accuracy": accuracy(truth, predictions),
                "macro_f1": macro_f1(truth, predictions), "loss": nll}
