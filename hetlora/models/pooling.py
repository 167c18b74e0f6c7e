"""How a classification model turns token states into the features its head reads.

Two poolings, recorded in the AdapterSpec so every party builds the same model:
  native  transformers' AutoModelForSequenceClassification as it is (BERT: the [CLS] state
          through the pretrained pooler and tanh; decoder models: the last token)
  mean    f = normalize(sum_t m_t h_t / sum_t m_t), the masked mean of the last hidden states,
          L2-normalised: how sentence-transformers checkpoints (e.g. all-MiniLM-L6-v2) were
          trained, and what they declare in `modules.json` / `1_Pooling/config.json`
The head is one linear layer in both: logits = W f + b.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("native", "mean")


def declared_pooling(model_dir) -> str:
    """'mean' when the folder is a sentence-transformers checkpoint declaring mean pooling, else 'native'."""
    config = Path(model_dir) / "1_Pooling" / "config.json"
    if not (Path(model_dir) / "modules.json").is_file() or not config.is_file():
        return "native"
    try:
        declared = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return "native"
    return "mean" if declared.get("pooling_mode_mean_tokens") else "native"


class MeanPoolingClassifier(nn.Module):
    """logits = W normalize(masked mean of h) + b over a transformers encoder.

    The encoder sits under its own `base_model_prefix` (BERT: `bert`) and the head is `classifier`,
    so parameter and module names equal AutoModelForSequenceClassification's.
    """

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.base_model_prefix = encoder.base_model_prefix
        self.config = encoder.config
        self.config.num_labels = num_labels
        setattr(self, self.base_model_prefix, encoder)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    @property
    def encoder_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def set_attn_implementation(self, implementation: str) -> None:
        self.encoder_model.set_attn_implementation(implementation)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(mean, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.classifier(self.features(input_ids, attention_mask)))


def head_module(model: nn.Module, dense_names) -> nn.Linear:
    """The linear head of a classification model: the module owning the dense (head) parameters."""
    owners = {name.rpartition(".")[0] for name in dense_names}
    if len(owners) != 1:
        raise ValueError(f"expected one head module, found {sorted(owners)}")
    head = model.get_submodule(owners.pop())
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the head {type(head).__name__} is not a linear layer")
    return head
