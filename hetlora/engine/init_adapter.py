"""A run's starting global from an existing adapter (`hetlora serve --init-adapter`).

The adapter is a PEFT LoRA folder (its scale folded into B, hetlora.protocol.peft_format) or a
wire-format file. It must fit the run's spec: the same modules and shapes, rank r at most the
global rank R. Global version 0 is the rule's usual start with the first r components replaced:
A[:r] = A_init, B[:, :r] = B_init; the remaining R - r components keep the rule's random A and
zero B, so dW = B_init @ A_init exactly (the model computes what the adapter computes) and the
extra components can still learn. Dense tensors (the head) are the adapter's when it has them;
without them the head comes from round 0 (head statistics), which must then be enabled; round 0
also replaces an adapter's head when it runs. The run's rule is wrapped (`StartsFromAdapter`, by `run_rule`
for both transports), so every place that starts a global starts from the adapter.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from hetlora.protocol.wire import LORA_A, LORA_B, Adapter, WireFormatError, decode, validate
from hetlora.errors import UserError
from hetlora.engine.aggregation import make_rule
from hetlora.protocol.peft_format import load_peft


def read_init_adapter(path: str | Path) -> Adapter:
    """A PEFT folder or a wire-format file as a wire adapter; UserError when it is neither."""
    path = Path(path)
    if path.is_dir():
        return load_peft(path)
    if not path.is_file():
        raise UserError(f"--init-adapter {path} does not exist; pass a PEFT adapter folder or a wire .safetensors file")
    return decode(path.read_bytes())


def check_init_adapter(adapter: Adapter, spec, global_rank: int, head_round: bool) -> None:
    """UserError unless `adapter` fits the run: spec modules and shapes, rank <= global rank, a head unless
    round 0 sets one."""
    if spec.dense and not adapter.dense and not head_round:
        raise UserError("--init-adapter has no classification head (PEFT modules_to_save); let round 0 set it with "
                        "--head-init lda (or ncm), or import an adapter that carries the head")
    checked = adapter if adapter.dense else Adapter(
        lora=adapter.lora, dense={n: np.zeros(s, np.float32) for n, s in spec.dense.items()})
    try:
        validate(checked, spec, max_rank=global_rank)
    except WireFormatError as exc:
        if exc.code == "rank_too_high":
            raise UserError(f"--init-adapter has rank {adapter.rank}, above the run's global rank {global_rank}; "
                            "raise --global-rank (or --ranks)") from None
        raise UserError(f"--init-adapter does not fit this run: {exc}; it must be trained on the same base model with "
                        "the run's --targets (and, for classification, the same number of labels)") from None


def init_digest(adapter: Adapter) -> str:
    """sha256 over the adapter's tensors (name, shape, float32 bytes) in name order: what a state dir is bound to.
    Not over encode()'s bytes, whose header order is not fixed."""
    h = hashlib.sha256()
    tensors = {n + LORA_A: a for n, (a, _) in adapter.lora.items()} | \
        {n + LORA_B: b for n, (_, b) in adapter.lora.items()} | adapter.dense
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name], np.float32)
        h.update(f"{name}:{t.shape};".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def start_global(start: Adapter, init: Adapter) -> Adapter:
    """The rule's start with `init`'s components in front and its dense tensors, if it has any."""
    r = init.rank
    lora = {}
    for name, (a, b) in start.lora.items():
        a, b = a.copy(), b.copy()
        a[:r], b[:, :r] = init.lora[name]
        lora[name] = (a, b)
    dense = init.dense or start.dense
    return Adapter(lora=lora, dense={n: t.copy() for n, t in dense.items()},
                   meta=start.meta | {"init_adapter": init_digest(init)})


class StartsFromAdapter:
    """An aggregation rule whose `init_global` (global version 0, also under round 0's head) is the wrapped
    rule's with the init adapter overlaid (`start_global`); everything else is the wrapped rule's."""

    def __init__(self, rule, init: Adapter):
        self.rule, self.init = rule, init

    def __getattr__(self, name):
        return getattr(self.rule, name)

    def init_global(self, spec, global_rank: int, seed: int) -> Adapter:
        return start_global(self.rule.init_global(spec, global_rank, seed), self.init)


def run_rule(config) -> object:
    """The run's aggregation rule, the same for both transports: `make_rule(config.aggregator, **rule_options)`
    (UserError for options it refuses), started from `config.init_adapter` when the run has one."""
    try:
        rule = make_rule(config.aggregator, **config.rule_options)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return rule if config.init_adapter is None else StartsFromAdapter(rule, config.init_adapter)
