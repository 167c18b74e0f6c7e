"""What the ServerApp knows about each SuperNode: its name, device profile, sample count and tier.

A node introduces itself once (a `query` message answered by the ClientApp, like the HTTP client's registration, and
checked by the same hetlora.engine.registration) and reports a fresh profile with every update; its tier follows the
run's tier policy exactly as on the HTTP server (`hetlora.engine.tiers.client_tier`: the policy, the request, the
rank set, never above the rank the node pruned itself to).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hetlora.protocol.plan import Tier
from hetlora.engine.errors import CannotTrain, Invalid
from hetlora.engine.registration import check_registration
from hetlora.engine.tiers import client_tier

log = logging.getLogger("hetlora.flower")


@dataclass
class Node:
    node_id: int
    name: str  # orders and seeds the node (node-config `name`, else "node-<id>")
    profile: dict
    requested_rank: int
    n_samples: int
    tier: Tier | None = None  # None: the tier policy rules the device out of training now
    pruned_rank: int | None = None
    why_not: str = ""


def retier(config, node: Node) -> None:
    """Re-decide the node's tier from its profile (hysteresis from its current rank): no tier while the policy rules
    the device out (CannotTrain, its message in why_not); Invalid for a malformed profile, as an HTTP registration."""
    previous = node.tier.rank if node.tier else None
    try:
        node.tier = client_tier(config, node.profile, node.requested_rank, node.pruned_rank, previous)
        node.why_not = ""
    except CannotTrain as exc:
        node.tier, node.why_not = None, exc.message


def introduce(config, node_id: int, doc: dict) -> Node:
    """A Node from a ClientApp's introduction {name, profile, requested_rank, n_samples}, its fields checked as an
    HTTP registration's (hetlora.engine.registration: Invalid); a node without a name is "node-<id>"."""
    name, profile = doc.get("name") or f"node-{node_id}", doc.get("profile")
    requested, n_samples = doc.get("requested_rank"), doc.get("n_samples")
    check_registration(config, name, profile, requested, n_samples)
    node = Node(node_id=node_id, name=name, profile=profile, requested_rank=requested, n_samples=n_samples)
    retier(config, node)
    log.info("node %s (%d): tier rank %s, %d samples%s", node.name, node_id, node.tier.rank if node.tier else 0,
             n_samples, f" (not training: {node.why_not})" if node.tier is None else "")
    return node


def report(config, node: Node, profile, pruned_rank: int | None) -> None:
    """After an accepted update: keep the rank it pruned itself to (CheckedUpdate.pruned_rank, as the HTTP server
    keeps it), take the fresh profile, re-decide the tier."""
    if pruned_rank is not None:
        node.pruned_rank = pruned_rank
    kept = node.profile
    if isinstance(profile, dict):
        node.profile = profile
    try:
        retier(config, node)
    except Invalid as exc:  # as an HTTP profile report refused: the tier is decided from the profile before
        log.warning("node %s: fresh profile refused (%s); its tier follows the last one", node.name, exc.message)
        node.profile = kept
        retier(config, node)
