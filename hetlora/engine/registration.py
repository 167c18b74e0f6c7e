"""What a client declares when it joins a run, checked once for both transports (an HTTP registration, a Flower
node's introduction): its name, device profile, requested rank and training-row count.

The rule for the count: 1..`max_client_samples`. FedAvg-style rules weigh a client by its rows; a client with
none carries no weight, cannot send a valid update (an upload's `n_samples` is at least 1) and, alone in a
round, would make a weighted mean divide by zero, so it is refused when it joins, not when it uploads. The
tier (what the client trains at) is hetlora.engine.tiers.client_tier's; each transport maps the Invalid raised
here (HTTP: 400; Flower: the node is left out with the message logged).
"""

from __future__ import annotations

from hetlora.engine.errors import Invalid

MAX_NAME_CHARS = 200


def check_registration(config, name, profile, requested_rank, n_samples) -> None:
    """A joining client's fields (Invalid `bad_request` / `bad_rank` with a one-line message): `name` None or a
    string of at most MAX_NAME_CHARS, `profile` a JSON object, `requested_rank` an integer >= 1, `n_samples` an
    integer in 1..config.max_client_samples."""
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
        raise Invalid("bad_request", f"name must be a string of at most {MAX_NAME_CHARS} characters")
    if not isinstance(profile, dict):
        raise Invalid("bad_request", f"profile must be a JSON object, got {type(profile).__name__}")
    check_requested_rank(requested_rank)
    cap = config.max_client_samples
    if not _is_int(n_samples) or not 1 <= n_samples <= cap:
        raise Invalid("bad_request", f"n_samples must be an integer in 1..{cap} (a client without training rows "
                      f"has no weight; the server's max-client-samples caps it), got {n_samples!r}")


def check_requested_rank(requested_rank) -> None:
    """A requested rank is an integer >= 1 (Invalid `bad_rank`): at registration and in a profile report."""
    if not _is_int(requested_rank) or requested_rank < 1:
        raise Invalid("bad_rank", f"requested_rank must be an integer of at least 1, got {requested_rank!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
