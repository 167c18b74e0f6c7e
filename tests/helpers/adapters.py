"""Wire adapters for tests: random ones of a spec, moved or mixed ones of a start, and the project's own model's
logits with one loaded."""

from __future__ import annotations

import numpy as np

from hetlora.protocol.wire import Adapter

PEFT_TEXTS = ["how do I activate my new card", "what is the exchange rate for euros", "the quick brown fox"]


def random_adapter(spec, rank: int, seed: int, *, scale: float = 0.2, b_scale: float | None = None,
                   dense: bool = True) -> Adapter:
    """Normal(0, scale) A factors at `rank` for every spec module, Normal(0, b_scale or scale) B factors, and
    (`dense`) Normal(0, scale) dense tensors: a global as after some rounds (non-zero A and B)."""
    rng = np.random.default_rng(seed)
    lora = {name: (rng.normal(0, scale, (rank, m.in_features)).astype(np.float32),
                   rng.normal(0, scale if b_scale is None else b_scale, (m.out_features, rank)).astype(np.float32))
            for name, m in spec.modules.items()}
    tensors = {name: rng.normal(0, scale, shape).astype(np.float32) for name, shape in spec.dense.items()} if dense \
        else {}
    return Adapter(lora=lora, dense=tensors)


def moved(start: Adapter, scale: float, seed: int, meta=None) -> Adapter:
    """`start` with every factor and dense tensor moved in a random direction by exactly RMS `scale` per element
    (honest clients' updates are alike in size: within 1.6x of the median on the demo)."""
    rng = np.random.default_rng(seed)

    def step(t):
        direction = rng.standard_normal(t.shape)
        return (t + scale * np.sqrt(t.size) * direction / np.linalg.norm(direction)).astype(np.float32)

    return Adapter(lora={n: (step(a), step(b)) for n, (a, b) in start.lora.items()},
                   dense={n: step(t) for n, t in start.dense.items()}, meta=meta or {})


def changed(start: Adapter, update: Adapter, t: float) -> Adapter:
    """start + t (update - start), every tensor."""
    mix = lambda s, u: (s + t * (u.astype(np.float64) - s)).astype(np.float32)  # noqa: E731
    return Adapter(lora={n: (mix(start.lora[n][0], a), mix(start.lora[n][1], b)) for n, (a, b) in update.lora.items()},
                   dense={n: mix(start.dense[n], u) for n, u in update.dense.items()}, meta=update.meta)


def our_logits(model_dir, task, adapter, num_labels=None):
    """The project's own model on PEFT_TEXTS: LoRALinear layers with the wire adapter loaded (B / s, scale s)."""
    import torch

    from edge_client.lora import inject_lora, load_adapter
    from hetlora.models.adapter_spec import derive_spec
    from hetlora.models.task_model import load_task_model, load_tokenizer

    model = load_task_model(model_dir, task, num_labels).eval()
    dense = dict(model.named_parameters())
    dense = {n: dense[n] for n in adapter.dense}
    inject_lora(model, derive_spec(model_dir, task, num_labels=num_labels).targets, rank=1, alpha=16)
    load_adapter(model, adapter, dense, alpha=16)
    enc = load_tokenizer(model_dir)(PEFT_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits, enc
