"""A client's tier: the rank it may train at and its batch / sequence caps, from its device profile and request.

A "hetlora-profile" document goes through the tier policy (profiles.policy.decide_tier, the same code
`hetlora profile --tier` runs on the device, with the server's `--policy` file); the policy's rank is then
capped by the client's request and rounded down to the server's rank set, and its batch size and sequence
length become the tier's caps. Any other JSON object (a profile of unknown shape) gets the largest server
rank not above the request and no caps. The aggregation rule turns the tier into the round's plan.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from hetlora.errors import UserError
from hetlora.protocol.plan import Tier
from hetlora.engine.errors import CannotTrain, Invalid
from profiles.policy import decide_tier

log = logging.getLogger("hetlora.server")


def tier_for(profile: dict, requested_rank: int, ranks: tuple[int, ...], *, previous_rank: int | None = None,
             spec=None, policy=None, model=None, steps: int | None = None) -> Tier:
    """Tier(min(policy rank, requested_rank) rounded down to a rank of `ranks` (the smallest one if all are
    above), the policy's batch size, sequence length and activation checkpointing).

    `previous_rank`: the client's current rank, for the policy's hysteresis; `spec`: the run's AdapterSpec,
    for exact LoRA parameter counts; `policy`: the tier policy document (None: the packaged tiers.json); `model`:
    the base model's ModelShape (None: the policy's model), for the predicted memory and step cost; `steps`: the
    run's local steps per round, for the compute budget.
    A device the policy rules out of training raises CannotTrain `cannot_train` with the policy's reasons; a
    malformed profile Invalid `bad_profile`.
    """
    cap, batch_size, seq_len, checkpointing = requested_rank, None, None, False
    if isinstance(profile, dict) and profile.get("schema") == "hetlora-profile":
        previous = {"rank": previous_rank} if previous_rank else None
        try:
            decision = decide_tier(profile, previous, spec=spec, policy=policy, model=model, steps=steps)
        except UserError as exc:
            raise Invalid("bad_profile", str(exc)) from None
        if decision.rank == 0:
            raise CannotTrain("cannot_train", "the tier policy rules this device out of training now: "
                           + "; ".join(decision.reasons), reasons=decision.reasons)
        log.info("tier policy: %s allows rank %d (its reasons at -v)", decision.tier, decision.rank)
        log.debug("tier policy: %s", "; ".join(decision.reasons))
        cap, batch_size, seq_len = min(cap, decision.rank), decision.batch_size, decision.seq_len
        checkpointing = decision.activation_checkpointing
    fitting = [r for r in ranks if r <= cap]
    return Tier(rank=max(fitting) if fitting else min(ranks), batch_size=batch_size, seq_len=seq_len,
                activation_checkpointing=checkpointing)


def client_tier(config, profile: dict, requested_rank: int, pruned_rank: int | None,
                previous_rank: int | None = None) -> Tier:
    """The run's tier policy's tier for a client, its rank never above a rank the client self-pruned to
    (CannotTrain `cannot_train` / Invalid `bad_profile` from `tier_for`)."""
    tier = tier_for(profile, requested_rank, config.ranks, previous_rank=previous_rank, spec=config.spec,
                    policy=config.policy, model=config.model_shape, steps=config.training.steps)
    return replace(tier, rank=min(tier.rank, pruned_rank)) if pruned_rank else tier
