"""The Flower ServerApp: introductions, the optional head stages, then the rule's rounds (RuleStrategy).

1. Wait (up to round-deadline seconds) for start-clients (at least min-clients) SuperNodes, then ask each to
   introduce itself (a `query` message): name, device profile, sample count, requested rank -> its rank (nodes.py).
2. With head-init ncm|lda: round 0 sends every node a "head" plan; the pooled class statistics give the
   head of global version 0 (hetlora.engine: the HTTP server's checks and formula).
3. `RuleStrategy.start` runs head-rounds + num-server-rounds rounds: the head rounds 1..head-rounds (every
   node fits the head; round 0's pooled class counts go into their plans), then the LoRA rounds; each
   waits round-deadline seconds for replies.
4. With output-dir set: global-final.safetensors (wire format) and history.json are written there.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from hetlora.protocol import atomic
from hetlora.protocol.wire import Adapter
from hetlora.errors import UserError
from hetlora_flower.nodes import introduce
from hetlora_flower.records import INTRO, PLAN, REPORT, json_record, message_content, payload_bytes, read_content
from hetlora_flower.settings import server_config
from hetlora_flower.strategy import RuleStrategy, global_record
from hetlora.engine.errors import DomainError
from hetlora.engine.combine import first_global, head_global
from hetlora.engine.init_adapter import run_rule
from hetlora.engine.planning import plan_for
from hetlora.engine.uploads import receive, take

log = logging.getLogger("hetlora.flower")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run(grid, dict(context.run_config))
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None


def run(grid: Grid, run_config: dict) -> RuleStrategy:
    """The whole run; returns the strategy (its history and final global) for callers and tests."""
    _show_logs()
    config = server_config(run_config)
    rule = run_rule(config)
    nodes = introduce_nodes(grid, config)
    if config.head_round:
        initial, class_counts = head_round(grid, config, rule, nodes)
    else:
        initial, class_counts = first_global(rule, config), None
    strategy = RuleStrategy(config, rule, nodes, class_counts)
    result = strategy.start(grid, initial_arrays=global_record(initial), num_rounds=config.last_round,
                            timeout=config.round_deadline)
    final = result.arrays or global_record(initial)  # Flower's Result starts with an empty ArrayRecord
    if run_config.get("output-dir"):
        write_outputs(Path(str(run_config["output-dir"])), payload_bytes(final), strategy, nodes)
    return strategy


def _show_logs() -> None:
    """The project's INFO lines in the ServerApp's output (what `flwr run --stream` and `flwr log` show)."""
    logger = logging.getLogger("hetlora")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s hetlora: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def introduce_nodes(grid: Grid, config) -> dict:
    """node id -> Node for every SuperNode that introduced itself (UserError when fewer than the first round
    needs: start-clients, at least min-clients, as the HTTP server's first round waits for)."""
    needed = config.first_round_clients
    deadline = time.monotonic() + config.round_deadline
    while len(list(grid.get_node_ids())) < needed and time.monotonic() < deadline:
        time.sleep(0.5)
    node_ids = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({INTRO: json_record({"run": config.run_config()})}), dst_node_id=node_id,
                        message_type=MessageType.QUERY) for node_id in node_ids]
    nodes, names = {}, set()
    for reply in grid.send_and_receive(messages, timeout=config.round_deadline):
        node_id = reply.metadata.src_node_id
        try:
            if reply.has_error():
                raise ValueError(reply.error.reason)
            node = introduce(config, node_id, read_content(reply.content, REPORT)[1])
            if node.name in names:
                raise ValueError(f"another node already uses the name {node.name!r}")
        except (ValueError, DomainError) as exc:
            log.warning("node %d left out: %s", node_id, exc)
            continue
        names.add(node.name)
        nodes[node_id] = node
    if len(nodes) < needed:
        raise UserError(f"{len(nodes)} of the {needed} nodes needed (start-clients, min-clients) introduced "
                        f"themselves within {config.round_deadline:g} s; start more SuperNodes or lower them")
    return nodes


def head_round(grid: Grid, config, rule, nodes: dict) -> tuple[Adapter, list[int]]:
    """Round 0: every node's class statistics, checked and pooled -> global version 0 and the pooled examples
    per class (the head rounds' plans carry them)."""
    trained = {node_id: node for node_id, node in nodes.items() if node.tier}
    plans = {node_id: plan_for(config, rule, node.name, node.tier, 0) for node_id, node in trained.items()}
    messages = [Message(message_content(None, PLAN, {"plan": plans[node_id].to_json(), "client_id": node.name,
                                                      "run": config.run_config()}),
                        dst_node_id=node_id, message_type=MessageType.TRAIN, group_id="0")
                for node_id, node in trained.items()]
    statistics = {}
    for reply in grid.send_and_receive(messages, timeout=config.round_deadline):
        node = trained.get(reply.metadata.src_node_id)
        try:
            if node is None or reply.has_error():
                raise ValueError(reply.error.reason if reply.has_error() else "unplanned reply")
            body, _ = read_content(reply.content, REPORT)
            received = receive(config, 0, body or b"")
            statistics[node.name] = take(config, plans[reply.metadata.src_node_id], node.name, received,
                                         node.n_samples).result
        except (ValueError, DomainError) as exc:
            log.warning("round 0: no head statistics from node %d: %s", reply.metadata.src_node_id, exc)
    if len(statistics) < config.required_uploads(len(trained)):
        raise UserError(f"round 0: {len(statistics)} nodes sent head statistics, min-clients is {config.min_clients}")
    names = sorted(statistics)
    initial, summary = head_global(rule, config, names, [statistics[name] for name in names])
    log.info("round 0 (head %s): %s", config.head_init, json.dumps(summary))
    return initial, summary["class_counts"]


def write_outputs(out: Path, final: bytes, strategy: RuleStrategy, nodes: dict) -> None:
    """global-final.safetensors and history.json (per round: stage, clients, ranks, statistics; per node: its
    rank)."""
    atomic.write_bytes(out / "global-final.safetensors", final)
    atomic.write_json(out / "history.json", {
        "rounds": strategy.history,
        "nodes": {n.name: {"tier": n.tier.to_json() if n.tier else None, "pruned_rank": n.pruned_rank,
                           "n_samples": n.n_samples, "not_training": n.why_not or None} for n in nodes.values()}})
