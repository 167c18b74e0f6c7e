"""One upload taken in: its header bounded, its bytes decoded ONCE, checked against the client's plan, and the
decoded object passed on (to the store's digest, to the round's combine step). Both transports call these.

    receive          the header within the limits of the round's upload kind; an adapter decoded (once) and
                     digested -> Received (the upload's identity, the decoded adapter or the statistics bytes)
    take             a received upload checked against the client's plan (an adapter: take_update) or, in round 0,
                     its statistics decoded and checked (head_round.check_statistics) -> Update
    take_update      a decoded adapter checked against its plan -> Update (digest, checked numbers, ClientResult)
    decode_update    wire bytes -> Adapter (Invalid with the wire code): a kept upload read back after a restart
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from hetlora.protocol import wire
from hetlora.protocol.energy import energy_of
from hetlora.protocol.head_stats import TENSORS as HEAD_TENSORS
from hetlora.protocol.head_stats import HeadStatistics
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.wire import Adapter, WireFormatError, read_header, spec_tensors
from hetlora.engine.head_round import check_statistics
from hetlora.engine.aggregation import ClientResult
from hetlora.engine.config import ServerConfig
from hetlora.engine.errors import Invalid
from hetlora.engine.upload_checks import CheckedUpdate, check_update, update_digest


@dataclass(frozen=True)
class Received:
    """An upload before its round's checks: what identifies it (the content digest of an adapter, the sha256 of
    statistics bytes) and, in an adapter round, the decoded adapter (None: statistics, decoded by their checks
    from `body`)."""

    digest: str
    adapter: Adapter | None
    body: bytes


@dataclass(frozen=True)
class Update:
    """An accepted upload: its digest, what the checks found, and the combine step's input (a ClientResult, or
    round 0's HeadStatistics)."""

    digest: str
    checked: CheckedUpdate
    result: ClientResult | HeadStatistics


def receive(config: ServerConfig, round_number: int, body: bytes) -> Received:
    """Round n's upload: its header within the limits of the round's upload kind (Invalid `header_too_large`)
    before it is parsed; an adapter decoded (once) and digested, statistics bytes only hashed."""
    if config.stage(round_number) != "head-statistics":
        adapter = decode_update(config, body)
        return Received(update_digest(adapter), adapter, body)
    try:
        read_header(body, max_tensors=len(HEAD_TENSORS))
    except WireFormatError as exc:
        raise Invalid(exc.code, str(exc)) from None
    return Received(hashlib.sha256(body).hexdigest(), None, body)


def take(config: ServerConfig, plan: ClientPlan, client_id: str, received: Received, declared_samples: int) -> Update:
    """A received upload checked against the client's round-n plan (Invalid with the check's code): an adapter by
    `take_update`; round 0's statistics within the client's `declared_samples` (rank 0, their energy report)."""
    if received.adapter is not None:
        return take_update(config, plan, client_id, received.adapter, received.digest)
    stats = check_statistics(config, client_id, received.body, declared_samples)
    return Update(received.digest, CheckedUpdate(0, 0, stats.n_samples, energy_of(stats.meta)), stats)


def decode_update(config: ServerConfig, body: bytes) -> Adapter:
    """An adapter upload's wire bytes decoded, the header limited to the spec's tensors before it is parsed (Invalid
    with the wire code). Every adapter upload goes through here once (once more after a restart)."""
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
