"""Head rounds under Flower: the ServerApp's whole run in one process, and the strategy's checks of a head reply.

`LoopbackGrid` hands every message the ServerApp sends to the ClientApp of its node, as a SuperNode
would, and keeps the traffic; the expected globals are recomputed from what the nodes sent (round 0's
statistics, np.average of the heads weighted by their samples, the rule on the LoRA updates).
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from hetlora.protocol.spec import linear_head
from hetlora.protocol.wire import Adapter, decode, encode
from hetlora_flower import client_app
from hetlora_flower.nodes import introduce
from hetlora_flower.records import PLAN, REPORT, message_content, payload_bytes, read_content
from hetlora_flower.server_app import run
from hetlora_flower.settings import server_config
from hetlora_flower.strategy import RuleStrategy, global_record
from hetlora.engine.aggregation import ClientResult, make_rule
from hetlora.engine.aggregation.bounds import CLIP_FACTOR
from hetlora.engine.head_round import initial_global, load_statistics
from tests.helpers.flower import LABELS, ROWS, LoopbackGrid, bounded

SIZES = {"a": 5, "b": 8, "c": 11}  # rows per node: three different sample counts
NODE_IDS = {"a": 21, "b": 22, "c": 23}
pytestmark = pytest.mark.usefixtures("task_identity")


def _node_rows(k: int, size: int) -> list[tuple[str, str]]:
    return [ROWS[(k + i) % len(ROWS)] for i in range(size)]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_bert_dir):
    """Three nodes with different data; run config: ncm head, 2 head rounds, then 2 hetlora rounds of 2 nodes
    (cosine lr decay: the second LoRA round at half the lr)."""
    work = tmp_path_factory.mktemp("flower-head-rounds")
    (work / "labels.json").write_text(json.dumps(LABELS))
    run_config = {"rule": "hetlora", "num-server-rounds": 2, "lr-decay": "cosine", "lr": 0.01, "ranks": "2,4",
                  "global-rank": 4, "min-clients": 2, "clients-per-round": 2, "local-steps": 2, "batch-size": 4, "seq-len": 16, "head-init": "ncm",
                  "head-rounds": 2, "head-epochs": 3, "head-fit-lr": 0.05, "round-deadline": 30.0,
                  "model": str(tiny_bert_dir), "labels": str(work / "labels.json"), "output-dir": str(work / "out")}
    contexts, counts = {}, Counter()
    for k, (name, size) in enumerate(SIZES.items()):
        rows = _node_rows(k, size)
        counts.update(label for _, label in rows)
        with (work / f"{name}.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([("text", "label")] + rows)
        node_config = {"data": str(work / f"{name}.csv"), "name": name, "model-dir": str(tiny_bert_dir),
                       "device": "jetson-agx-orin", "requested-rank": 2 if name == "a" else 4}
        contexts[NODE_IDS[name]] = Context(run_id=1, node_id=NODE_IDS[name], node_config=node_config,
                                           state=RecordDict(), run_config=run_config)
    return work, run_config, contexts, [counts[label] for label in LABELS]


def _round(traffic, number: int) -> dict:
    """name -> (its plan document, the download, the reply's body) of one round's train messages."""
    out = {}
    for message, reply in traffic:
        if message.metadata.message_type == MessageType.TRAIN and message.metadata.group_id == str(number):
            payload, doc = read_content(message.content, PLAN)
            out[doc["client_id"]] = (doc, payload, read_content(reply.content, REPORT)[0])
    return out


def _average_heads(previous: Adapter, bodies: dict) -> Adapter:
    """The reference: np.average of the sent heads weighted by their n_samples; previous's factors."""
    heads = [decode(body) for _, body in sorted(bodies.items())]
    weights = [h.meta["n_samples"] for h in heads]
    dense = {name: np.average([h.dense[name] for h in heads], axis=0, weights=weights).astype(np.float32)
             for name in previous.dense}
    return Adapter(lora=previous.lora, dense=dense)


def _clipped_to_the_lower_of_two(bodies: dict, start: Adapter) -> dict:
    """Two clients' heads under bounded influence, written out: per tensor, a change from `start` larger than
    CLIP_FACTOR x the smaller of the two changes (the low median of two) is scaled down to that bound."""
    heads = {name: decode(body) for name, body in bodies.items()}
    for tensor, origin in start.dense.items():
        changes = {name: h.dense[tensor].astype(np.float64) - origin for name, h in heads.items()}
        bound = CLIP_FACTOR * min(np.linalg.norm(c) for c in changes.values())
        for name, change in changes.items():
            scale = min(1.0, bound / np.linalg.norm(change))
            heads[name].dense[tensor] = (origin + scale * change).astype(np.float32)
    return {name: encode(h) for name, h in heads.items()}


@pytest.mark.slow
def test_a_flower_run_with_head_rounds_averages_the_heads_then_trains_lora(federation):
    work, run_config, contexts, pooled = federation
    grid = LoopbackGrid(contexts)
    strategy = run(grid, run_config)
    config, rule = server_config(run_config), make_rule("hetlora")
    assert [(h["round"], h["stage"]) for h in strategy.history] == [(1, "head-fit"), (2, "head-fit"), (3, "lora"),
                                                                     (4, "lora")]
    assert json.loads((work / "out" / "history.json").read_text())["rounds"][0]["stage"] == "head-fit"

    statistics = [load_statistics(config, body) for _, (_, _, body) in sorted(_round(grid.traffic, 0).items())]
    expected, _ = initial_global(rule, config.spec, statistics, head_init="ncm", global_rank=4, seed=config.seed,
                                 shrinkage=config.head_shrinkage, temperature=config.head_temperature)
    global0 = expected
    for number in (1, 2):
        sent = _round(grid.traffic, number)
        assert sorted(sent) == sorted(SIZES)  # every node, although clients-per-round is 2
        for name, (doc, payload, body) in sent.items():
            assert doc["plan"]["mode"] == "head-fit" and doc["plan"]["class_counts"] == pooled
            download = decode(payload)
            assert not download.lora and set(download.dense) == set(config.spec.dense)
            for tensor, value in expected.dense.items():
                np.testing.assert_allclose(download.dense[tensor], value, rtol=1e-6, atol=1e-7)
            upload = decode(body)
            assert not upload.lora and upload.meta["n_samples"] == SIZES[name] and upload.meta["mode"] == "head-fit"
        expected = _average_heads(expected, {name: body for name, (_, _, body) in sent.items()})
        assert strategy.history[number - 1]["statistics"]["clipped"] == {}
        assert strategy.history[number - 1]["statistics"]["head_change"] > 0  # the nodes did move the head
        assert strategy.history[number - 1]["n_samples"] == SIZES

    for name, (doc, payload, _) in _round(grid.traffic, 3).items():
        download = decode(payload)
        view = rule.client_view(global0, doc["plan"]["rank"])  # the head rounds left round 0's factors alone
        for module, (a, b) in view.lora.items():
            np.testing.assert_array_equal(download.lora[module][0], a)
            np.testing.assert_array_equal(download.lora[module][1], b)
        for tensor, value in expected.dense.items():
            np.testing.assert_allclose(download.dense[tensor], value, rtol=1e-6, atol=1e-7)

    for number, lr in ((3, 0.01), (4, 0.005)):  # LoRA rounds 1 and 2 of 2 under the cosine decay
        lora_round = _round(grid.traffic, number)
        assert len(lora_round) == 2  # clients-per-round again
        assert all(doc["plan"]["training"]["lr"] == pytest.approx(lr) for doc, _, _ in lora_round.values())
        results = [ClientResult(adapter=decode(body), n_samples=decode(body).meta["n_samples"])
                   for _, (_, _, body) in sorted(lora_round.items())]
        expected = rule.aggregate(expected, bounded(rule, expected, results))
    final = decode((work / "out" / "global-final.safetensors").read_bytes())
    assert final.meta["global_version"] == 4
    for module, (a, b) in expected.lora.items():
        np.testing.assert_allclose(final.lora[module][0], a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(final.lora[module][1], b, rtol=1e-5, atol=1e-6)
    for tensor, value in expected.dense.items():
        np.testing.assert_allclose(final.dense[tensor], value, rtol=1e-5, atol=1e-6)


def _head_round_one(run_config, contexts, pooled):
    """The strategy's head round 1 from an initial global, each message answered by the node's ClientApp."""
    config, rule = server_config(run_config), make_rule("hetlora")
    nodes = {node_id: introduce(config, node_id, client_app._local_node(context, config.run_config()).introduction())
             for node_id, context in contexts.items()}
    strategy = RuleStrategy(config, rule, nodes, pooled)
    start = rule.init_global(config.spec, config.global_rank, config.seed)
    messages = strategy.plan_round(1, global_record(config, start, 0), set(contexts))
    return strategy, start, [client_app.app(m, contexts[m.metadata.dst_node_id]) for m in messages]


def _name(reply: Message) -> str:
    return {node_id: name for name, node_id in NODE_IDS.items()}[reply.metadata.src_node_id]


@pytest.mark.parametrize("forgery", ["lora", "shape"])
def test_a_head_reply_with_factors_or_a_wrong_shape_is_refused(federation, forgery, caplog):
    _, run_config, contexts, pooled = federation
    strategy, start, replies = _head_round_one(run_config, contexts, pooled)
    weight_name = linear_head(strategy.config.spec)[0]
    bodies = {_name(r): read_content(r.content, REPORT)[0] for r in replies}
    forged_reply = next(r for r in replies if _name(r) == "b")
    body, report = read_content(forged_reply.content, REPORT)
    forged = decode(body)
    if forgery == "lora":
        forged = Adapter(lora=start.lora, dense=forged.dense, meta=forged.meta)
    else:
        forged.dense[weight_name] = forged.dense[weight_name][:, :-1]
    replies[replies.index(forged_reply)] = Message(
        message_content(encode(forged), REPORT, report),
        reply_to=Message(RecordDict(), dst_node_id=NODE_IDS["b"], message_type=MessageType.TRAIN))

    arrays, metrics = strategy.aggregate_train(1, replies)
    assert ("update from b refused: " + ("a head round's upload carries the head only" if forgery == "lora"
                                         else f"{weight_name}: shape")) in caplog.text
    new_global = decode(payload_bytes(arrays))
    want = _average_heads(start, _clipped_to_the_lower_of_two({name: body for name, body in bodies.items()
                                                               if name != "b"}, start))
    for tensor, value in want.dense.items():
        np.testing.assert_allclose(new_global.dense[tensor], value, rtol=1e-6, atol=1e-7)
    for module, (a, b) in start.lora.items():
        np.testing.assert_array_equal(new_global.lora[module][0], a)
        np.testing.assert_array_equal(new_global.lora[module][1], b)
    assert strategy.history[-1]["clients"] == ["a", "c"] and metrics["num-examples"] == SIZES["a"] + SIZES["c"]


def test_a_node_fits_the_head_as_the_http_client_does(federation, tiny_bert_dir):
    """A node's head reply = edge_client.head_fit.fit_head on features from a fresh trainer, with the plan's
    logit adjustment, epochs, learning rate, batch size and seed."""
    from edge_client.backends import make_trainer
    from edge_client.data import load_examples
    from edge_client.head_fit import fit_head, logit_adjustment

    work, run_config, contexts, pooled = federation
    strategy, start, replies = _head_round_one(run_config, contexts, pooled)
    reply = next(r for r in replies if _name(r) == "c")
    plan = strategy._plans[NODE_IDS["c"]].to_json()  # as the node received it
    config = strategy.config
    trainer = make_trainer("torch", model_dir=tiny_bert_dir, task="classification", labels=LABELS,
                           targets=list(config.spec.targets), lora_alpha=config.training.lora_alpha,
                           pooling=config.spec.pooling)
    features, labels = trainer.frozen_features(load_examples(work / "c.csv", "classification", LABELS),
                                               plan["training"]["seq_len"])
    weight_name, bias_name, _, _ = linear_head(config.spec)
    want = fit_head(start.dense[weight_name], start.dense[bias_name], features, labels,
                    logit_adjustment(labels, len(LABELS), pooled), epochs=3, lr=0.05,
                    batch_size=plan["training"]["batch_size"], seed=plan["training"]["seed"])
    sent = decode(read_content(reply.content, REPORT)[0])
    np.testing.assert_allclose(sent.dense[weight_name], want.weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sent.dense[bias_name], want.bias, rtol=1e-5, atol=1e-6)
    energy = sent.meta.pop("energy")  # the fit's seconds at the node's catalog device's watts
    assert energy["watts_source"] == "catalog:jetson-agx-orin" and energy["seconds"] > 0
    assert sent.meta == {"round": 1, "client_id": "c", "mode": "head-fit", "n_samples": SIZES["c"],
                         "loss_before": pytest.approx(want.loss_before), "loss_after": pytest.approx(want.loss_after)}
