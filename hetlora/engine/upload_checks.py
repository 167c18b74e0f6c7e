"""The checks of one LoRA update against the client's plan for the round: one pure function, one error type.

`check_update(adapter, plan, spec, round_number, client_id)` returns the upload's ranks and sample count or
raises `WireFormatError(code, message)`; hetlora.engine.uploads turns it into Invalid with that code. Nothing here
touches the store, HTTP or the clock. `update_digest` identifies an update's content.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from hetlora.protocol.energy import energy_of
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.spec import AdapterSpec
from hetlora.protocol.wire import LORA_A, LORA_B, Adapter, WireFormatError, check_values, meta_int, validate


@dataclass(frozen=True)
class CheckedUpdate:
    """What the server records about an accepted update."""

    rank: int
    effective_rank: int
    n_samples: int
    energy: dict | None = None  # the checked training seconds and energy estimate (hetlora.protocol.energy)

    @property
    def pruned_rank(self) -> int | None:
        """The rank the client pruned itself to this round (its later tiers stay at or below it), None when it
        did not prune."""
        return self.effective_rank if self.effective_rank < self.rank else None


def check_update(adapter: Adapter, plan: ClientPlan, spec: AdapterSpec, *, round_number: int, client_id: str,
                 aggregator: str) -> CheckedUpdate:
    """Metadata (round, client, rank = the plan's, effective_rank, n_samples, the energy report if any: `energy_of`),
    tensors against the spec at most
    the plan's rank, effective_rank in plan min_upload_rank..rank and equal to the tensors' rank, plora indices
    equal to the plan's, values within the bounds. A head-fit plan's upload is the head alone: no LoRA
    factors, rank 0. WireFormatError names the first problem."""
    meta = adapter.meta
    if meta_int(meta, "round", minimum=1) != round_number:
        raise WireFormatError("bad_metadata", f"metadata round {meta['round']} does not match the URL round "
                              f"{round_number}")
    if meta.get("client_id") != client_id:
        raise WireFormatError("client_mismatch", f"metadata client_id {meta.get('client_id')!r} is not the client "
                              f"of this token ({client_id})")
    n_samples = meta_int(meta, "n_samples", minimum=1)
    energy = energy_of(meta)
    if plan.mode == "head-fit":
        return _check_head(adapter, spec, n_samples, energy)
    rank = meta_int(meta, "rank", minimum=1)
    effective_rank = meta_int(meta, "effective_rank", minimum=1)
    if rank != plan.rank:
        raise WireFormatError("rank_mismatch", f"metadata rank {rank} is not the rank {plan.rank} assigned for "
                              f"round {round_number}")
    tensor_rank = validate(adapter, spec, max_rank=plan.rank)
    check_values(adapter)
    if tensor_rank != effective_rank:
        raise WireFormatError("rank_mismatch", f"the tensors have rank {tensor_rank} but metadata effective_rank "
                              f"is {effective_rank}")
    if effective_rank < plan.min_upload_rank:
        raise WireFormatError("rank_mismatch", f"upload rank {effective_rank} is below {plan.min_upload_rank}, "
                              f"the lowest rank the {aggregator} plan for this round allows")
    if plan.indices is not None and meta.get("indices") != list(plan.indices):
        raise WireFormatError("wrong_indices", f"metadata indices {meta.get('indices')!r} are not the indices "
                              f"assigned for round {round_number}: {list(plan.indices)}")
    return CheckedUpdate(rank, effective_rank, n_samples, energy)


def _check_head(adapter: Adapter, spec: AdapterSpec, n_samples: int, energy: dict | None) -> CheckedUpdate:
    """A head round's upload: the spec's dense tensors, finite and within the bounds, and no LoRA factors."""
    if adapter.meta.get("mode") != "head-fit":
        raise WireFormatError("bad_metadata", f"this round fits the head: metadata mode must be 'head-fit', got "
                              f"{adapter.meta.get('mode')!r}")
    if adapter.lora:
        raise WireFormatError("unexpected_lora", f"a head round's upload carries the head only; it has LoRA factors "
                              f"for {len(adapter.lora)} modules")
    if not spec.dense:
        raise WireFormatError("missing_tensor", "this run's model has no dense head to fit")
    validate(adapter, spec, max_rank=0, require_all_modules=False)
    check_values(adapter)
    return CheckedUpdate(rank=0, effective_rank=0, n_samples=n_samples, energy=energy)


def update_digest(adapter: Adapter) -> str:
    """sha256 of an update's content, whatever order its safetensors header lists things in:
    the canonical meta JSON, then per tensor (sorted by wire name) its name, shape and float32 bytes."""
    tensors = {name + LORA_A: a for name, (a, _) in adapter.lora.items()}
    tensors |= {name + LORA_B: b for name, (_, b) in adapter.lora.items()}
    tensors |= adapter.dense
    h = hashlib.sha256(json.dumps(adapter.meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name], dtype=np.float32)
        h.update(f"\0{name}\0{list(t.shape)}\0".encode())
        h.update(t.tobytes())
    return h.hexdigest()
