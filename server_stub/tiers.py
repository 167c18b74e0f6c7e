"""Rank assignment: which LoRA rank a client trains at, from its device profile and request.

A "hetlora-profile" document goes through the tier policy (profiles.policy.decide_tier, the same code
`hetlora profile --tier` runs on the device); the policy's rank is then capped by the client's request
and rounded down to the server's rank set. Any other JSON object (a profile of unknown shape) gets the
largest server rank not above the request.
"""

from __future__ import annotations

import logging

from hetlora.errors import UserError
from server_stub.errors import ApiError

log = logging.getLogger("hetlora.server")


def assign_rank(profile: dict, requested_rank: int, ranks: tuple[int, ...], *, previous_rank: int | None = None,
                spec=None) -> int:
    """min(policy rank, requested_rank), rounded down to a rank of `ranks` (the smallest one if all are above).

    `previous_rank`: the client's current rank, for the policy's hysteresis; `spec`: the run's AdapterSpec,
    for exact LoRA parameter counts. A device the policy rules out of training gets 422 `cannot_train`
    with the policy's reasons; a malformed profile 400 `bad_profile`.
    """
    cap = requested_rank
    if isinstance(profile, dict) and profile.get("schema") == "hetlora-profile":
        from profiles.policy import decide_tier

        previous = {"rank": previous_rank} if previous_rank else None
        try:
            decision = decide_tier(profile, previous, spec=spec)
        except UserError as exc:
            raise ApiError(400, "bad_profile", str(exc)) from None
        if decision.rank == 0:
            raise ApiError(422, "cannot_train", "the tier policy rules this device out of training now: "
                           + "; ".join(decision.reasons), reasons=decision.reasons)
        log.info("tier policy: %s (rank %d): %s", decision.tier, decision.rank, "; ".join(decision.reasons))
        cap = min(cap, decision.rank)
    fitting = [r for r in ranks if r <= cap]
    return max(fitting) if fitting else min(ranks)
