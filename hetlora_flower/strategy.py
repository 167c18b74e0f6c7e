"""RuleStrategy: a Flower Strategy whose rounds are the project's rules.

Flower's rounds 1..H+R are the run's rounds after round 0: the head rounds 1..H, then R LoRA rounds
(`config.stage(n)`, as on the HTTP server).
Every step is the round engine's (hetlora.engine), as on the HTTP server; this module only moves messages.
configure_train: `planning.select` over the node names in order (every node in a head round), `planning.plan_for`
per node (a head round's plan carries round 0's pooled class counts), sent with `planning.download_view` of the
global in one message per node.
aggregate_train: every reply decoded once and checked against its plan (`uploads.receive`, `uploads.take`, the
HTTP coordinator's two calls), then `combine.combine`: bounded influence with the anchored reference, the robust
option, then a LoRA round's pure rule and server optimiser or a head round's mean head. The anchors and
optimiser state stay in memory; each round's history entry is `history.round_entry`, the HTTP server's.
The global travels between rounds as wire bytes (records.payload_record).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hetlora.engine.combine import combine, jsonable
from hetlora.engine.history import round_entry
from hetlora.engine.errors import DomainError
from hetlora.engine.planning import download_view, plan_for, select
from hetlora.engine.uploads import receive, take
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.wire import Adapter, decode, encode
from hetlora_flower import nodes as node_book
from hetlora_flower.records import PLAN, REPORT, message_content, payload_bytes, payload_record, read_content

log = logging.getLogger("hetlora.flower")


def global_record(adapter: Adapter) -> ArrayRecord:
    """A global version (with its metadata: hetlora.engine.combine) as the wire bytes the HTTP server stores."""
    return payload_record(encode(adapter))


class RuleStrategy(Strategy):
    """Per-node plans out, the project's checks and rule in. `nodes`: node id -> nodes.Node; `class_counts`:
    round 0's pooled examples per class (hetlora.engine.combine.head_global's summary), for the head rounds."""

    def __init__(self, config, rule, nodes: dict, class_counts=None):
        self.config, self.rule, self.nodes, self.class_counts = config, rule, nodes, class_counts
        self.optimizer_state: dict = {}
        self.anchors: dict = {}  # stage -> quantity -> anchor of the bounds (hetlora.engine.aggregation.bounds)
        self.history: list[dict] = []
        self._plans: dict[int, ClientPlan] = {}  # node id -> this round's plan
        self._names: dict[int, str] = {}
        self._previous: Adapter | None = None

    def summary(self) -> None:
        log.info("RuleStrategy: rule %s %s, ranks %s, global rank %d, %d nodes, server optimiser %s",
                 self.config.aggregator, self.config.rule_options, list(self.config.ranks), self.config.global_rank,
                 len(self.nodes), self.config.server_opt.name)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.plan_round(server_round, arrays, set(grid.get_node_ids()))

    def plan_round(self, server_round: int, arrays: ArrayRecord, live: set[int]) -> list[Message]:
        """One message per selected node among the `live` ones: its plan and the rule's view of the global."""
        self._previous = decode(payload_bytes(arrays))
        eligible = sorted((n for n in self.nodes.values() if n.tier and n.node_id in live), key=lambda n: n.name)
        chosen = set(select(self.config, [n.name for n in eligible], server_round))
        self._plans, self._names, messages = {}, {}, []
        for node in (n for n in eligible if n.name in chosen):
            plan = plan_for(self.config, self.rule, node.name, node.tier, server_round, self.class_counts)
            self._plans[node.node_id], self._names[node.node_id] = plan, node.name
            body = encode(download_view(self.rule, self._previous, plan, node.name, self.config))
            doc = {"plan": plan.to_json(), "client_id": node.name, "run": self.config.run_config()}
            messages.append(Message(message_content(body, PLAN, doc), dst_node_id=node.node_id,
                                    message_type=MessageType.TRAIN, group_id=str(server_round)))
        log.info("round %d (%s): %s", server_round, self.config.stage(server_round),
                 ", ".join(f"{self._names[n]}@r{p.rank}" for n, p in self._plans.items()))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self._accepted(server_round, replies)
        order = [node_id for node_id in self._plans if node_id in accepted]  # selection (name) order
        required = self.config.required_uploads(len(self._plans))
        if not order or len(order) < required:
            log.warning("round %d: %d of the %d required updates arrived; the global stays as it was",
                        server_round, len(order), required)
            return None, None
        updates = [accepted[node_id][0] for node_id in order]
        reports = [accepted[node_id][1] for node_id in order]
        results = [update.result for update in updates]
        combined = combine(self.rule, self.config, server_round, self._previous, [self._names[n] for n in order],
                           results, [self._plans[n] for n in order], self.anchors, self.optimizer_state)
        self.anchors, self.optimizer_state = combined.anchors, combined.optimizer_state
        if self.config.stage(server_round) == "lora":
            for node_id, update, report in zip(order, updates, reports):
                node_book.report(self.config, self.nodes[node_id], report.get("profile"), update.checked.pruned_rank)
        self._record(server_round, order, updates, reports, combined.statistics)
        return global_record(combined.new_global), _metrics(results, reports)

    def _accepted(self, server_round: int, replies: Iterable[Message]) -> dict:
        """node id -> (uploads.Update, report) of every reply that passes the checks; the others are logged."""
        accepted = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            plan = self._plans.get(node_id)
            who = self._names.get(node_id, f"node {node_id}")
            if plan is None or reply.has_error():
                log.warning("round %d: no update from %s: %s", server_round, who,
                            reply.error.reason if reply.has_error() else "it was not planned this round")
                continue
            try:
                body, report = read_content(reply.content, REPORT)
                update = take(self.config, plan, who, receive(self.config, server_round, body or b""),
                              self.nodes[node_id].n_samples)
                accepted[node_id] = (update, report)
            except (DomainError, ValueError) as exc:
                log.warning("round %d: update from %s refused: %s", server_round, who, exc)
        return accepted

    def _record(self, server_round, order, updates, reports, statistics) -> None:
        """The round's history entry: the engine's (hetlora.engine.history.round_entry, as on the HTTP server) and
        each node's local loss after training."""
        names = [self._names[node_id] for node_id in order]
        plans = {self._names[node_id]: plan for node_id, plan in self._plans.items()}
        entry = round_entry(server_round, self.config.stage(server_round), plans,
                            {name: update.checked for name, update in zip(names, updates)}, statistics)
        self.history.append(entry | {"loss_after": jsonable(dict(zip(names, (r.get("loss_after") for r in reports))))})
        log.info("round %d (%s) aggregated (%s) from %s", server_round, self.config.stage(server_round),
                 self.config.aggregator,
                 ", ".join(f"{n}@r{u.checked.effective_rank}" for n, u in zip(names, updates)))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is offline (`hetlora evaluate` on the final global)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _metrics(results, reports) -> MetricRecord:
    """n-weighted mean local losses before and after training, and the round's totals."""
    n = [res.n_samples for res in results]
    total = float(sum(n))
    mean = lambda key: sum(k * float(r.get(key) or 0.0) for k, r in zip(n, reports)) / total  # noqa: E731
    return MetricRecord({"clients": len(results), "num-examples": int(total),
                         "loss-before": mean("loss_before"), "loss-after": mean("loss_after")})
