"""The frozen base model's pooled features: what the head reads, for round 0's statistics and the head rounds.

The features are what the classification head reads (hetlora.models.pooling), computed by the
frozen base model with no LoRA update; batches are length-sorted and trimmed (padding is masked,
so the features equal those of fixed-length batches).
"""

from __future__ import annotations

import numpy as np
import torch

from edge_client.data import Encoded, trimmed_batches
from hetlora.models.pooling import head_module


@torch.no_grad()
def pooled_features(model: torch.nn.Module, dense_names, encoded: Encoded, batch_size: int = 64) -> np.ndarray:
    """(n, d) float64: what the linear head reads for each row of `encoded`, `model` in eval mode."""
    head = head_module(model, dense_names)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        features = np.zeros((len(encoded), head.in_features), dtype=np.float64)
        for rows, batch in trimmed_batches(encoded, batch_size):
            captured.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if len(captured) != 1 or captured[0].shape != (len(rows), head.in_features):
                raise ValueError("the head does not read one pooled feature vector per example; "
                                 "head initialisation needs a pooled classification model")
            features[rows] = captured[0].double().numpy()
    finally:
        hook.remove()
        model.train(was_training)
    return features
