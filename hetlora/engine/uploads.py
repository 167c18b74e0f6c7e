"""One upload taken in: its header bounded, its bytes decoded ONCE, checked against the client's plan, and the
decoded object passed on (to the store's digest, to the round's combine step). Both transports call these.

    receive          the header within the limits of the round's upload kind, then (an adapter round) the one
                     decode: -> Received (the upload's identity and the decoded adapter)
    decode_update    wire bytes -> Adapter (Invalid with the wire code); the Flower strategy's receive
    take_update      a decoded adapter checked against its plan -> Update (digest, checked numbers, ClientResult)

Round-0 statistics are decoded (once) by their checks, hetlora.engine.head_round.check_statistics.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from hetlora.protocol import wire
from hetlora.protocol.head_stats import TENSORS as HEAD_TENSORS
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.wire import Adapter, WireFormatError, read_header, spec_tensors
from hetlora.engine.aggregation import ClientResult
from hetlora.engine.config import ServerConfig
from hetlora.engine.errors import Invalid
from hetlora.engine.upload_checks import CheckedUpdate, check_update, update_digest


@dataclass(frozen=True)
class Received:
    """An upload before its round's checks: what identifies it (the content digest of an adapter, the sha256 of
    statistics bytes) and, in an adapter round, the decoded adapter (None: statistics, decoded by their checks)."""

    digest: str
    adapter: Adapter | None


@dataclass(frozen=True)
class Update:
    """An accepted adapter upload: its content digest, what the checks found, and the rule's input."""

    digest: str
    checked: CheckedUpdate
    result: ClientResult


def receive(config: ServerConfig, round_number: int, body: bytes) -> Received:
    """Round n's upload: its header within the limits of the round's upload kind (Invalid `header_too_large`)
    before it is parsed, then an adapter decoded (once) and digested; statistics bytes are only hashed."""
    statistics = config.stage(round_number) == "head-statistics"
    try:
        read_header(body, max_tensors=len(HEAD_TENSORS) if statistics else spec_tensors(config.spec))
    except WireFormatError as exc:
        raise Invalid(exc.code, str(exc)) from None
    if statistics:
        return Received(hashlib.sha256(body).hexdigest(), None)
    adapter = decode_update(config, body)
    return Received(update_digest(adapter), adapter)


def decode_update(config: ServerConfig, body: bytes) -> Adapter:
    """An adapter upload's wire bytes decoded, the header limited to the spec's tensors before it is parsed (Invalid
    with the wire code). Every adapter upload goes through here once."""
    try:
        return wire.decode(body, max_tensors=spec_tensors(config.spec))
    except WireFormatError as exc:
        raise Invalid(exc.code, str(exc)) from None


def take_update(config: ServerConfig, plan: ClientPlan, client_id: str, adapter: Adapter,
                digest: str | None = None) -> Update:
    """A decoded adapter checked against the client's plan (Invalid with the check's code); `digest`: its
    `update_digest` when the caller already has it."""
    try:
        checked = check_update(adapter, plan, config.spec, round_number=plan.round, client_id=client_id,
                               aggregator=config.aggregator)
    except WireFormatError as exc:
        raise Invalid(exc.code, str(exc)) from None
    return Update(digest=digest or update_digest(adapter), checked=checked,
                  result=ClientResult(adapter=adapter, n_samples=checked.n_samples, indices=plan.indices))
