"""The Flower pieces in one process: run config, records, the ClientApp on real messages, the strategy's checks.

The ClientApp is called the way a SuperNode calls it (a Message and a Context); its replies go into
RuleStrategy.aggregate_train unchanged, or tampered with to show the HTTP server's checks refuse them.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from hetlora.errors import UserError
from hetlora.protocol.wire import decode, encode
from hetlora_flower import client_app
from hetlora_flower.nodes import introduce
from hetlora_flower.records import PLAN, REPORT, message_content, payload_bytes, payload_record, read_content
from hetlora_flower.settings import serve_arguments, server_config
from hetlora_flower.strategy import RuleStrategy, global_record
from hetlora.engine.combine import first_global
from hetlora.engine.aggregation import ClientResult, make_rule
from tests.helpers.flower import LABELS, ROWS, bounded

pytestmark = pytest.mark.usefixtures("task_identity")


def test_run_config_keys_are_serve_flags():
    argv = serve_arguments({"rule": "plora", "num-server-rounds": 3, "segment-average": True, "head-lr": "",
                            "weighting": "", "output-dir": "/tmp/x", "local-steps": 5})
    assert argv == ["--local-steps", "5", "--rounds", "3", "--aggregator", "plora", "--segment-average"]
    with pytest.raises(UserError, match="'port' is an option of the HTTP server"):
        serve_arguments({"port": 8080})
    with pytest.raises(UserError, match="invalid choice: 'nope'"):
        server_config({"rule": "nope"})


def test_head_rounds_come_before_the_lora_rounds_and_need_a_head_init(setup):
    config, contexts = setup
    run_config = dict(contexts[11].run_config) | {"num-server-rounds": 2, "clients-per-round": 2}
    config = server_config(run_config | {"head-init": "ncm", "head-rounds": 3})
    assert config.last_round == 5 and [config.stage(n) for n in range(6)] == ["head-statistics"] + ["head-fit"] * 3 \
        + ["lora"] * 2
    assert [config.round_size(n) for n in (1, 4)] == [0, 2]  # a head round selects every node
    with pytest.raises(UserError, match="--head-rounds needs --head-init ncm or lda"):
        server_config(run_config | {"head-rounds": 3})  # the setup's head-init is none


def test_wire_bytes_cross_an_array_record_exactly():
    data = bytes(range(256)) * 3
    assert payload_bytes(payload_record(data)) == data
    body, doc = read_content(message_content(data, PLAN, {"plan": {"rank": 4}, "indices": None}), PLAN)
    assert body == data and doc == {"plan": {"rank": 4}, "indices": None}


def _setup(work, tiny_bert_dir, node_settings: dict, rule: str = "plora"):
    (work / "labels.json").write_text(json.dumps(LABELS))
    with (work / "data.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("text", "label")] + ROWS * 2)
    run_config = {"rule": rule, "num-server-rounds": 1, "ranks": "2,4", "global-rank": 4, "min-clients": 2,
                  "local-steps": 2, "batch-size": 4, "seq-len": 16, "model": str(tiny_bert_dir),
                  "labels": str(work / "labels.json"), "head-init": "none"}
    config = server_config(run_config)
    node_config = {"data": str(work / "data.csv"), "model-dir": str(tiny_bert_dir), "device": "jetson-agx-orin",
                   **node_settings}
    contexts = {node_id: Context(run_id=1, node_id=node_id, node_config=node_config | {"name": name,
                "requested-rank": rank}, state=RecordDict(), run_config=run_config)
                for node_id, name, rank in ((11, "a", 2), (12, "b", 4))}
    return config, contexts


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert_dir):
    return _setup(tmp_path_factory.mktemp("flower-apps"), tiny_bert_dir, {})


@pytest.fixture(scope="module")
def executorch_setup(tmp_path_factory, tiny_bert_dir, tiny_artifacts):
    """The same two nodes training from the session's ExecuTorch artifacts, with hetlora: Select-N-Fold (plora)
    changes frozen weights, which an exported artifact cannot."""
    return _setup(tmp_path_factory.mktemp("flower-executorch"), tiny_bert_dir,
                  {"backend": "executorch", "artifacts-dir": str(tiny_artifacts)}, "hetlora")


def _round_one(config, contexts):
    """The strategy's messages for round 1, each answered by the ClientApp as its SuperNode would."""
    nodes = {}
    for node_id, context in contexts.items():
        doc = client_app._local_node(context, config.run_config()).introduction()
        nodes[node_id] = introduce(config, node_id, doc)
    rule = make_rule(config.aggregator)
    strategy = RuleStrategy(config, rule, nodes)
    start = first_global(rule, config)
    messages = strategy.plan_round(1, global_record(start), set(contexts))
    replies = [client_app.app(message, contexts[message.metadata.dst_node_id]) for message in messages]
    return strategy, start, replies


@pytest.mark.slow  # both nodes train tiny BERT (from ExecuTorch artifacts, too)
@pytest.mark.parametrize("nodes", ["setup", pytest.param("executorch_setup", marks=pytest.mark.exports("tiny_export"))])
def test_the_strategy_aggregates_exactly_what_the_client_app_sent(nodes, request):
    config, contexts = request.getfixturevalue(nodes)
    strategy, start, replies = _round_one(config, contexts)
    assert [strategy._plans[r.metadata.src_node_id].rank for r in replies] == [2, 4]
    arrays, metrics = strategy.aggregate_train(1, replies)
    sent = [decode(read_content(r.content, REPORT)[0]) for r in replies]
    results = [ClientResult(adapter=a, n_samples=a.meta["n_samples"],
                            indices=tuple(a.meta["indices"]) if a.meta.get("indices") is not None else None)
               for a in sent]
    expected = make_rule(config.aggregator).aggregate(start, bounded(make_rule(config.aggregator), start, results))
    final = decode(payload_bytes(arrays))
    for name, (a, b) in expected.lora.items():
        np.testing.assert_array_equal(final.lora[name][0], a)
        np.testing.assert_array_equal(final.lora[name][1], b)
    assert metrics["clients"] == 2 and metrics["num-examples"] == 16
    assert all(np.abs(b).max() > 0 for a in sent for _, b in a.lora.values())  # every node trained (B left 0)


@pytest.mark.slow
def test_an_update_that_breaks_its_plan_is_refused(setup, caplog):
    config, contexts = setup
    strategy, _, replies = _round_one(config, contexts)
    body, report = read_content(replies[1].content, REPORT)
    forged = decode(body)
    forged.meta["indices"] = [0, 1, 2, 3][: len(forged.meta["indices"])][::-1]  # not the planned indices
    replies[1] = Message(message_content(encode(forged), REPORT, report), reply_to=_instruction(replies[1]))
    assert strategy.aggregate_train(1, replies) == (None, None)  # 1 of the 2 required updates
    assert "refused: metadata indices" in caplog.text


def _instruction(reply: Message) -> Message:
    """An instruction message from the reply's node, to address a replacement reply."""
    return Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type="train")


def test_a_node_without_data_answers_a_one_line_error(setup):
    config, contexts = setup
    context = contexts[11]
    bare = Context(run_id=1, node_id=13, node_config={"name": "c"}, state=RecordDict(), run_config=context.run_config)
    message = Message(message_content(None, "intro", {"run": config.run_config()}), dst_node_id=13,
                      message_type="query")
    reply = client_app.app(message, bare)
    assert reply.has_error() and reply.error.code == client_app.USER_ERROR
    assert reply.error.reason.startswith("this SuperNode has no training data") and "\n" not in reply.error.reason


@pytest.mark.slow
def test_the_server_optimiser_steps_on_the_rules_aggregate(setup):
    config, contexts = setup
    config = server_config(dict(contexts[11].run_config) | {"server-opt": "adam", "server-lr": 0.1})
    strategy, start, replies = _round_one(config, contexts)
    arrays, _ = strategy.aggregate_train(1, replies)
    sent = [decode(read_content(r.content, REPORT)[0]) for r in replies]
    results = [ClientResult(adapter=a, n_samples=a.meta["n_samples"], indices=tuple(a.meta["indices"])) for a in sent]
    aggregated = make_rule("plora").aggregate(start, bounded(make_rule("plora"), start, results))
    expected, state = config.server_opt.step(start, aggregated, {}, product_space=False)
    final = decode(payload_bytes(arrays))
    name = sorted(expected.lora)[0]
    np.testing.assert_array_equal(final.lora[name][1], expected.lora[name][1])
    assert not np.array_equal(final.lora[name][1], aggregated.lora[name][1])
    assert strategy.optimizer_state.keys() == state.keys()


@pytest.mark.slow
def test_the_nodes_report_training_seconds_and_energy_and_the_history_records_them(setup):
    from profiles.catalog import device

    config, contexts = setup
    own = contexts[11]  # node "a" gives its own figure; node "b" presents the catalog's Jetson AGX Orin
    contexts = contexts | {11: Context(run_id=1, node_id=11, node_config=dict(own.node_config) | {"watts": "3.5"},
                                       state=RecordDict(), run_config=own.run_config)}
    strategy, _, replies = _round_one(config, contexts)
    strategy.aggregate_train(1, replies)
    energy = strategy.history[-1]["energy"]
    sent = {a.meta["client_id"]: a.meta["energy"]
            for a in (decode(read_content(r.content, REPORT)[0]) for r in replies)}
    assert energy["clients"] == sent and energy["unknown"] == []
    orin = device("jetson-agx-orin")["power"]["typical_training_w"]
    for name, (watts, source) in {"a": (3.5, "--watts"), "b": (orin, "catalog:jetson-agx-orin")}.items():
        report = sent[name]
        assert report["seconds"] > 0 and (report["watts"], report["watts_source"]) == (watts, source)
        assert report["joules"] == pytest.approx(watts * report["seconds"], rel=1e-9)
    assert energy["joules"] == pytest.approx(sent["a"]["joules"] + sent["b"]["joules"])


@pytest.mark.parametrize("watts", ["nan", "-1", "many"])
def test_a_bad_node_config_watts_is_a_one_line_error(watts):
    from hetlora_flower.device import node_settings

    with pytest.raises(UserError, match="^node config watts: ") as err:
        node_settings({"data": "x.csv", "watts": watts}, {}, 1)
    assert "\n" not in str(err.value)
