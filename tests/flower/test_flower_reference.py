"""The Flower ServerApp's aggregate, every rule, against the papers' formulas written independently of the rule
code (tests/helpers/server.py: np.average of what the nodes sent, dense products B A for hlora, norm weights for
hetlora, each index moved by the round's mean change for plora), with one node whose sample count is clipped.

The whole run goes through the public ServerApp (`run`) on a LoopbackGrid; one node lies about its sample count
(a million, its adapter untouched). Bounded influence must clip that count to CLIP_FACTOR x the round's lower
median and say so in the history; the reference weighs the node with the clipped count.
"""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from hetlora.protocol.wire import decode, encode
from hetlora_flower.records import PLAN, REPORT, message_content, read_content
from hetlora_flower.server_app import run
from hetlora_flower.settings import server_config
from hetlora.engine.aggregation import make_rule
from hetlora.engine.aggregation.bounds import CLIP_FACTOR
from tests.helpers.flower import LABELS, ROWS, LoopbackGrid
from tests.helpers.server import assert_matches_reference, reference_global

pytestmark = [pytest.mark.usefixtures("task_identity"), pytest.mark.slow]  # three nodes train tiny BERT
SIZES = {"a": 6, "b": 9, "liar": 12}  # rows per node
NODE_IDS = {"a": 31, "b": 32, "liar": 33}
CLAIMED = 10**6


class LyingGrid(LoopbackGrid):
    """The liar's LoRA replies claim CLAIMED samples; every other reply goes through unchanged."""

    def answer(self, message):
        reply = super().answer(message)
        if message.metadata.dst_node_id != NODE_IDS["liar"] or message.metadata.message_type != MessageType.TRAIN:
            return reply
        body, report = read_content(reply.content, REPORT)
        upload = decode(body)
        upload.meta["n_samples"] = CLAIMED
        return Message(message_content(encode(upload), REPORT, report), reply_to=message)


def federation(work, tiny_bert_dir, rule: str) -> tuple[dict, dict]:
    (work / "labels.json").write_text(json.dumps(LABELS))
    run_config = {"rule": rule, "num-server-rounds": 1, "ranks": "2,4", "global-rank": 4, "min-clients": 3,
                  "clients-per-round": 3, "local-steps": 2, "batch-size": 4, "seq-len": 16, "head-init": "none",
                  "model": str(tiny_bert_dir), "labels": str(work / "labels.json"), "output-dir": str(work / "out")}
    if rule == "hlora":  # the sum of the client ranks (2 + 4 + 4) fits: the global product is exact
        run_config["hlora-rank"] = 16
    contexts = {}
    for k, (name, size) in enumerate(SIZES.items()):
        with (work / f"{name}.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([("text", "label")] + [ROWS[(k + i) % len(ROWS)] for i in range(size)])
        node_config = {"data": str(work / f"{name}.csv"), "name": name, "model-dir": str(tiny_bert_dir),
                       "device": "jetson-agx-orin", "requested-rank": 2 if name == "a" else 4}
        contexts[NODE_IDS[name]] = Context(run_id=1, node_id=NODE_IDS[name], node_config=node_config,
                                           state=RecordDict(), run_config=run_config)
    return run_config, contexts


@pytest.mark.parametrize("rule", ["fedavg", "hetlora", "hlora", "plora"])
def test_the_flower_global_is_the_papers_formula_with_the_liars_count_clipped(rule, tiny_bert_dir, tmp_path):
    run_config, contexts = federation(tmp_path, tiny_bert_dir, rule)
    grid = LyingGrid(contexts)
    strategy = run(grid, run_config)
    config = server_config(run_config)
    start = make_rule(rule).init_global(config.spec, config.global_rank, config.seed)  # the run's input, round 0

    sent = {}
    for message, reply in grid.traffic:
        if message.metadata.message_type == MessageType.TRAIN:
            doc = read_content(message.content, PLAN)[1]
            sent[doc["client_id"]] = decode(read_content(reply.content, REPORT)[0])
    assert sorted(sent) == sorted(SIZES) and sent["liar"].meta["n_samples"] == CLAIMED
    cap = CLIP_FACTOR * statistics.median_low([SIZES["a"], SIZES["b"], CLAIMED])  # the round's reference is 9
    counts = {"a": SIZES["a"], "b": SIZES["b"], "liar": max(1, math.floor(cap / CLAIMED * CLAIMED))}

    entry = strategy.history[-1]
    assert "n_samples" in entry["statistics"]["clipped"]["liar"], entry["statistics"]["clipped"]
    assert set(entry["statistics"]["clipped"]) == {"liar"}
    uploads = [(sent[name], counts[name], upload_indices(sent[name])) for name in sorted(sent)]
    final = decode((tmp_path / "out" / "global-final.safetensors").read_bytes())
    assert_matches_reference(rule, final, reference_global(rule, start, uploads))


def upload_indices(upload) -> list | None:
    indices = upload.meta.get("indices")
    return list(indices) if indices is not None else list(range(upload.meta["rank"]))
