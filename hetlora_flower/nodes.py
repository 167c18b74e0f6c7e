"""What the ServerApp knows about each SuperNode: its name, device profile, sample count and rank.

A node introduces itself once (a `query` message answered by the ClientApp, like the HTTP client's
registration) and reports a fresh profile with every update; its rank follows the tier policy exactly
as on the HTTP server (`server_stub.ranks.assign_rank`, the run's rank set, fedavg's single rank, and
never above the rank it pruned itself to).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from server_stub.errors import ApiError
from server_stub.ranks import assign_rank

log = logging.getLogger("hetlora.flower")


@dataclass
class Node:
    node_id: int
    name: str  # orders and seeds the node (node-config `name`, else "node-<id>")
    profile: dict
    requested_rank: int
    n_samples: int
    rank: int = 0  # 0: the tier policy rules the device out of training now
    pruned_rank: int | None = None
    why_not: str = ""


def rank_for(config, node: Node, previous_rank: int | None = None) -> int:
    """The node's training rank under the run's policy (0 when the policy says it cannot train)."""
    try:
        rank = config.rule_rank(assign_rank(node.profile, node.requested_rank, config.ranks,
                                            previous_rank=previous_rank, spec=config.spec))
    except ApiError as exc:
        node.why_not = exc.message
        return 0
    node.why_not = ""
    return min(rank, node.pruned_rank) if node.pruned_rank else rank


def introduce(config, node_id: int, doc: dict) -> Node:
    """A Node from a ClientApp's introduction {name, profile, requested_rank, n_samples} (ValueError)."""
    name, profile = doc.get("name") or f"node-{node_id}", doc.get("profile")
    requested, n_samples = doc.get("requested_rank") or max(config.ranks), doc.get("n_samples")
    if not isinstance(profile, dict) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"node {node_id}: the introduction needs a profile object and a positive requested_rank")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"node {node_id}: n_samples must be a positive integer, got {n_samples!r}")
    node = Node(node_id=node_id, name=str(name), profile=profile, requested_rank=requested, n_samples=n_samples)
    node.rank = rank_for(config, node)
    log.info("node %s (%d): rank %s, %d samples%s", node.name, node_id, node.rank, n_samples,
             f" (not training: {node.why_not})" if not node.rank else "")
    return node


def report(config, node: Node, profile, effective_rank: int) -> None:
    """After an accepted update: keep a pruned rank, take the fresh profile, re-decide the next rank."""
    if effective_rank < node.rank:
        node.pruned_rank = effective_rank
    if isinstance(profile, dict):
        node.profile = profile
    node.rank = rank_for(config, node, previous_rank=node.rank)
