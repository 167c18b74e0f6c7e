"""The round engine (hetlora.engine) under its two transports: an upload's bytes are decoded once between the
route and the stored global and run straight down the layers, every domain refusal has one HTTP status, and the
HTTP server and the Flower ServerApp do the same things the same way (a bad registration refused with the same
words, the same wait for --start-clients, the same start from --init-adapter, the same history entry and global
for the same uploads).

Real servers on loopback with real SQLite state, the Flower ServerApp and strategy on in-process grids; the
expected globals are np.average of what the clients sent (fedavg) or the other transport's, not the rule's code.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import httpx
import numpy as np
import pytest

from hetlora.errors import UserError
from hetlora.protocol import wire
from hetlora.protocol.wire import Adapter, encode

LABELS = ("balance", "card", "transfer")


@pytest.fixture(scope="module")
def spec(tiny_bert_dir):
    from hetlora.models.adapter_spec import derive_spec

    return derive_spec(tiny_bert_dir, "classification", ("query", "value"), num_labels=len(LABELS))


@pytest.fixture
def counted_decodes(monkeypatch):
    """Every wire.decode call's input bytes, wherever a product module took `decode` from (the wire module or a
    name bound by `from hetlora.protocol.wire import decode`)."""
    seen: list[bytes] = []
    real = wire.decode

    def counting(data, *args, **kwargs):
        seen.append(bytes(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(wire, "decode", counting)
    for name, module in list(sys.modules.items()):
        product = name.split(".")[0] in ("hetlora", "server_stub", "hetlora_flower")
        if product and getattr(module, "decode", None) is real:
            monkeypatch.setattr(module, "decode", counting)
    return seen


def _update(spec, client: dict, rank: int, n_samples: int, seed: int) -> Adapter:
    rng = np.random.default_rng(seed)
    lora = {name: (rng.normal(0, 0.1, (rank, m.in_features)).astype(np.float32),
                   rng.normal(0, 0.1, (m.out_features, rank)).astype(np.float32)) for name, m in spec.modules.items()}
    dense = {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in spec.dense.items()}
    meta = {"round": 1, "client_id": client["client_id"], "rank": rank, "effective_rank": rank, "n_samples": n_samples}
    return Adapter(lora=lora, dense=dense, meta=meta)


def test_an_upload_is_decoded_once_from_the_route_to_the_stored_global(spec, tmp_path, counted_decodes):
    from hetlora.engine.config import ServerConfig
    from server_stub.background import serve_in_background

    config = ServerConfig(spec=spec, aggregator="fedavg", labels=LABELS, ranks=(4, 8), global_rank=8, min_clients=2,
                          rounds=2, seed=3)
    with serve_in_background(config, tmp_path / "state") as url, httpx.Client(base_url=url, timeout=30) as http:
        clients = []
        for name in ("a", "b"):
            reply = http.post("/v1/register", json={"profile": {}, "requested_rank": 8, "n_samples": 10, "name": name})
            assert reply.status_code == 201, reply.text
            clients.append(reply.json() | {"auth": {"Authorization": f"Bearer {reply.json()['token']}"}})
        download = http.get("/v1/rounds/1/adapter", headers=clients[0]["auth"]).content
        wire.decode(download)  # the test's own decode: proves the counter sees calls
        updates = [_update(spec, c, 8, n, seed=k) for k, (c, n) in enumerate(zip(clients, (10, 30)))]
        bodies = [encode(u) for u in updates]
        for client, body in zip(clients, bodies):
            reply = http.post("/v1/rounds/1/update", content=body, headers=client["auth"])
            assert reply.status_code == 201, reply.text
        assert reply.json()["round_state"] == "aggregated"
        stored = http.get("/v1/global").content
    assert counted_decodes.count(download) == 1
    assert [counted_decodes.count(body) for body in bodies] == [1, 1]
    new = wire.decode(stored)
    assert new.meta["global_version"] == 1
    for name in spec.modules:  # what the clients sent reached the global: the n-weighted mean of their factors
        for part in (0, 1):
            expected = np.average([u.lora[name][part] for u in updates], axis=0, weights=[10, 30])
            np.testing.assert_allclose(new.lora[name][part], expected, rtol=1e-5, atol=1e-6)


def test_every_domain_refusal_has_one_http_status():
    from hetlora.engine import errors
    from server_stub.errors import STATUS, api_error

    kinds = [k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.DomainError)
             and k is not errors.DomainError]
    assert sorted(k.__name__ for k in kinds if k not in STATUS) == []
    assert len({STATUS[k] for k in kinds}) == len(kinds)  # no two kinds share a status
    refused = api_error(errors.Conflict("round_closed", "round 1 is closed", current_round=2))
    assert (refused.status, refused.body()) == (409, {"error": {"code": "round_closed", "message": "round 1 is closed",
                                                                "current_round": 2}})


def _config(spec, **overrides):
    from hetlora.engine.config import ServerConfig

    return ServerConfig(**{"spec": spec, "aggregator": "fedavg", "labels": LABELS, "ranks": (4, 8), "global_rank": 8,
                           "min_clients": 1, "rounds": 2, "seed": 3, "round_deadline": 0.1} | overrides)


def _introduction_reply(message, doc: dict):
    """A node's answer to the ServerApp's introduction request."""
    from flwr.app import Message, RecordDict

    from hetlora_flower.records import REPORT, json_record

    return Message(RecordDict({REPORT: json_record(doc)}), reply_to=message)


def _introductions(config, docs: dict) -> dict:
    """The Flower ServerApp's introduction step over nodes answering `docs` (node id -> introduction): the nodes it
    kept (UserError when too few did)."""
    from hetlora_flower.server_app import introduce_nodes
    from tests.helpers.flower import LoopbackGrid

    class Introductions(LoopbackGrid):
        def answer(self, message):
            return _introduction_reply(message, docs[message.metadata.dst_node_id])

    return introduce_nodes(Introductions(dict.fromkeys(docs)), config)


BAD_PROFILE = {"schema": "hetlora-profile", "version": 2}
BAD_REGISTRATIONS = [{"n_samples": 0}, {"n_samples": 1001}, {"requested_rank": 0}, {"name": "x" * 201},
                     {"profile": BAD_PROFILE}]


@pytest.mark.usefixtures("task_identity")
def test_both_transports_refuse_the_same_bad_registration_with_the_same_message(spec, tmp_path, caplog):
    """One check (hetlora.engine.registration, then the tier policy) behind an HTTP registration and a Flower node's
    introduction: a client with no training rows or above the data cap, a rank below 1, a name too long, a malformed
    profile. HTTP answers 400 with the message and registers nobody; the ServerApp leaves the node out and logs the
    same message."""
    from hetlora_flower.nodes import report
    from server_stub.background import serve_in_background

    config = _config(spec, max_client_samples=1000)
    good = {"profile": {}, "requested_rank": 4, "n_samples": 1, "name": "dev"}
    with serve_in_background(config, tmp_path / "state") as url, httpx.Client(base_url=url, timeout=30) as http:
        for fields in BAD_REGISTRATIONS:
            reply = http.post("/v1/register", json=good | fields)
            assert reply.status_code == 400, (fields, reply.text)
            message = reply.json()["error"]["message"]
            caplog.clear()
            with pytest.raises(UserError, match="0 of the 1 nodes needed"):
                _introductions(config, {7: good | fields})
            assert f"node 7 left out: {message}\n" in caplog.text, (fields, message, caplog.text)
        assert http.get("/v1/status").json()["clients"] == []
        assert http.post("/v1/register", json=good).status_code == 201  # the control: one row is enough
    nodes = _introductions(config, {7: good})
    assert [(n.name, n.n_samples) for n in nodes.values()] == [("dev", 1)]
    node, tier = nodes[7], nodes[7].tier
    report(config, node, BAD_PROFILE, None)  # a malformed fresh profile later: refused, the tier stays
    assert (node.profile, node.tier) == ({}, tier) and tier is not None


@pytest.mark.usefixtures("task_identity")
def test_both_transports_wait_for_start_clients_before_the_first_round(spec, tmp_path):
    """--start-clients 2 with --min-clients 1: the HTTP server opens round 1 at the second registration, the Flower
    ServerApp needs two introduced nodes (it used to start with min-clients)."""
    from server_stub.background import serve_in_background

    config = _config(spec, start_clients=2, round_deadline=60.0)
    docs = {7: {"profile": {}, "requested_rank": 4, "n_samples": 5, "name": "a"},
            8: {"profile": {}, "requested_rank": 4, "n_samples": 5, "name": "b"}}
    with serve_in_background(config, tmp_path / "state") as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/v1/register", json=docs[7]).status_code == 201
        assert http.get("/v1/status").json()["round"]["state"] == "waiting"
        assert http.post("/v1/register", json=docs[8]).status_code == 201
        opened = http.get("/v1/status").json()["round"]
        assert (opened["number"], opened["state"]) == (1, "open")
    with pytest.raises(UserError, match="1 of the 2 nodes needed"):
        _introductions(replace(config, round_deadline=0.1), {7: docs[7]})
    assert sorted(n.name for n in _introductions(config, docs).values()) == ["a", "b"]


def _planned_update(spec, plan, client_id: str, n_samples: int, energy: dict | None, seed: int) -> bytes:
    """Random factors at the plan's rank (the same for the same seed), with the metadata the plan asks for."""
    rng = np.random.default_rng(seed)
    lora = {name: (rng.normal(0, 0.1, (plan.rank, m.in_features)).astype(np.float32),
                   rng.normal(0, 0.1, (m.out_features, plan.rank)).astype(np.float32))
            for name, m in spec.modules.items()}
    dense = {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in spec.dense.items()}
    meta = {"round": plan.round, "client_id": client_id, "rank": plan.rank, "effective_rank": plan.rank,
            "n_samples": n_samples, "indices": list(plan.indices)} | ({"energy": energy} if energy else {})
    return encode(Adapter(lora=lora, dense=dense, meta=meta))


def _rounded(value):
    """`value` with every float to 12 significant digits: a norm is a sum whose order numpy picks by the arrays'
    memory alignment, so two processes of the same numbers may differ in the last bit."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return float(f"{value:.12g}") if isinstance(value, float) else value


def _renamed(value, names: dict):
    """`value` with every client id (a string or a key) replaced by its name."""
    if isinstance(value, dict):
        return {names.get(k, k): _renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


JOINING = {"a": (2, 10, {"seconds": 2.0, "watts": 5.0, "watts_source": "--watts", "joules": 10.0, "estimated": True}),
           "b": (4, 30, None)}  # name -> requested rank, rows, the energy report of its upload


def _http_round(config, spec, state_dir):
    """One plora round over HTTP: (client id -> name, plans by name, the round's history entry, the global's bytes)."""
    from hetlora.protocol.plan import ClientPlan
    from server_stub.background import serve_in_background

    with serve_in_background(config, state_dir) as url, httpx.Client(base_url=url, timeout=30) as http:
        joined = {name: http.post("/v1/register", json={"profile": {}, "requested_rank": rank, "n_samples": n,
                                                         "name": name}).json()
                  for name, (rank, n, _) in JOINING.items()}
        names, plans = {joined[name]["client_id"]: name for name in JOINING}, {}
        for seed, (name, (_, n, energy)) in enumerate(JOINING.items()):
            auth = {"Authorization": f"Bearer {joined[name]['token']}"}
            plans[name] = ClientPlan.from_json(http.get("/v1/round", headers=auth).json()["plan"])
            body = _planned_update(spec, plans[name], joined[name]["client_id"], n, energy, seed)
            assert http.post("/v1/rounds/1/update", content=body, headers=auth).status_code == 201
        history = http.get("/v1/status").json()["history"]
        return names, plans, history[-1], http.get("/v1/global").content


def _flower_round(config, spec):
    """The same round through the Flower strategy: (plans by name, its history entry, the global's bytes)."""
    from flwr.app import Message

    from hetlora.engine.aggregation import make_rule
    from hetlora.engine.combine import first_global
    from hetlora.protocol.plan import ClientPlan
    from hetlora_flower.nodes import introduce
    from hetlora_flower.records import PLAN, REPORT, message_content, payload_bytes, read_content
    from hetlora_flower.strategy import RuleStrategy, global_record

    rule = make_rule(config.aggregator)
    nodes = {11 + k: introduce(config, 11 + k, {"name": name, "profile": {}, "requested_rank": rank, "n_samples": n})
             for k, (name, (rank, n, _)) in enumerate(JOINING.items())}
    strategy = RuleStrategy(config, rule, nodes)
    start = first_global(rule, config)
    plans, replies = {}, []
    for message in strategy.plan_round(1, global_record(start), set(nodes)):
        doc = read_content(message.content, PLAN)[1]
        name = doc["client_id"]
        plans[name] = ClientPlan.from_json(doc["plan"])
        _, n, energy = JOINING[name]
        body = _planned_update(spec, plans[name], name, n, energy, list(JOINING).index(name))
        replies.append(Message(message_content(body, REPORT, {"loss_after": 1.5}), reply_to=message))
    arrays, _ = strategy.aggregate_train(1, replies)
    return plans, strategy.history[-1], payload_bytes(arrays)


def _assert_same_adapter(got: Adapter, expected: Adapter) -> None:
    """The same metadata and, bit for bit, the same tensors (safetensors does not fix its header's key order)."""
    assert got.meta == expected.meta and set(got.lora) == set(expected.lora) and set(got.dense) == set(expected.dense)
    for name, (a, b) in expected.lora.items():
        np.testing.assert_array_equal(got.lora[name][0], a)
        np.testing.assert_array_equal(got.lora[name][1], b)
    for name, t in expected.dense.items():
        np.testing.assert_array_equal(got.dense[name], t)


@pytest.mark.usefixtures("task_identity")
def test_an_http_run_and_a_flower_run_of_the_same_uploads_write_the_same_history_entry(spec, tmp_path):
    """The same plora round (two clients at ranks 2 and 4, one energy report) over HTTP and through the Flower strategy:
    equal plans, the same global bit for bit, and equal history entries for every field both write (client ids
    named as the nodes are)."""
    config = _config(spec, aggregator="plora", ranks=(2, 4), global_rank=4, min_clients=2, round_deadline=600.0)
    names, http_plans, http_entry, http_global = _http_round(config, spec, tmp_path / "state")
    flower_plans, flower_entry, flower_global = _flower_round(config, spec)
    assert http_plans == flower_plans and {p.rank for p in http_plans.values()} == {2, 4}
    _assert_same_adapter(wire.decode(http_global), wire.decode(flower_global))
    http_entry = _renamed(http_entry, names)
    shared = sorted(set(http_entry) & set(flower_entry))
    assert shared == ["clients", "effective_ranks", "energy", "indices", "n_samples", "ranks", "round", "stage",
                      "statistics"]
    assert {key: _rounded(http_entry[key]) for key in shared} == {key: _rounded(flower_entry[key]) for key in shared}
    assert flower_entry["n_samples"] == {"a": 10, "b": 30} and flower_entry["energy"]["joules"] == 10.0
    assert flower_entry["energy"]["unknown"] == ["b"] and set(flower_entry["indices"]) == {"a", "b"}


def layer(module: str) -> str | None:
    """The path's unit of a module: each HTTP transport module on its own, the round engine as one (its
    aggregation included), the protocol transparent (the data's own format and type: decode, encode, validate,
    atomic writes; every layer reads the data through it)."""
    if module.startswith("hetlora.protocol"):
        return None
    return "hetlora.engine" if module.startswith("hetlora.engine") else module


def test_an_upload_runs_straight_down_the_layers_to_the_stored_global(spec, tmp_path):
    """The measure: the modules an upload's bytes are handed into (tests/helpers/data_path.py: a call is on the path
    when an argument is the bytes or an object derived from them), from the HTTP route handler (server_stub.app's
    `upload`) until Coordinator.accept_upload returns with the new global stored. The upload is the one that
    completes the round, so its path goes through the combine step to the global's blob and row. A module is
    entered by a call on the path from another module (`layer`: each server_stub module, the engine as one, the
    protocol transparent); consecutive repeats collapse. A return is an entry into a module that an earlier entry
    already entered: at most 3 in all."""
    import threading

    from server_stub.background import serve_in_background
    from tests.helpers.data_path import DataPath

    config = _config(spec, min_clients=2, round_deadline=600.0)
    path = DataPath(route=("server_stub.app", "upload"), end="accept_upload")
    threading.setprofile(path.profile)  # the server's threads, started below
    try:
        with serve_in_background(config, tmp_path / "state") as url, httpx.Client(base_url=url, timeout=30) as http:
            clients = []
            for name in ("a", "b"):
                reply = http.post("/v1/register", json={"profile": {}, "requested_rank": 8, "n_samples": 10,
                                                        "name": name})
                clients.append(reply.json() | {"auth": {"Authorization": f"Bearer {reply.json()['token']}"}})
            bodies = [encode(_update(spec, client, 8, 10 * (k + 1), seed=k)) for k, client in enumerate(clients)]
            assert http.post("/v1/rounds/1/update", content=bodies[0], headers=clients[0]["auth"]).status_code == 201
            path.follow(bodies[1])
            reply = http.post("/v1/rounds/1/update", content=bodies[1], headers=clients[1]["auth"])
            assert reply.status_code == 201 and reply.json()["round_state"] == "aggregated", reply.text
            assert path.done.wait(30)
            stored = http.get("/v1/global").content
    finally:
        threading.setprofile(None)
    sequence = path.sequence(layer)
    assert wire.decode(stored).meta["global_version"] == 1
    assert sequence[:2] == ["server_stub.app", "server_stub.rounds"] and sequence[-1] == "server_stub.store"
    assert {"hetlora.engine", "server_stub.round_state", "server_stub.global_versions"} <= set(sequence)
    assert sum(path.returns(sequence).values()) <= 3, " -> ".join(sequence)


@pytest.mark.usefixtures("task_identity")
def test_both_transports_start_from_the_init_adapter(tiny_bert_dir, labels_file, tmp_path):
    """`init-adapter` in a Flower run config and `hetlora serve --init-adapter`: the same global version 0, its
    first components the adapter's (A[:r] = A_init, B[:, :r] = B_init). The Flower ServerApp used to ignore it."""
    from flwr.app import Error, Message

    from hetlora_flower.server_app import run
    from hetlora_flower.settings import server_config
    from server_stub.background import serve_in_background
    from tests.helpers.flower import LoopbackGrid

    run_config = {"rule": "fedavg", "num-server-rounds": 1, "ranks": "2,4", "global-rank": 4, "min-clients": 1,
                  "head-init": "none", "round-deadline": 5.0, "model": str(tiny_bert_dir), "labels": str(labels_file)}
    spec = server_config(run_config).spec
    init = _update(spec, {"client_id": "init"}, 2, 1, seed=5)
    (tmp_path / "init.safetensors").write_bytes(encode(init))
    run_config |= {"init-adapter": str(tmp_path / "init.safetensors"), "output-dir": str(tmp_path / "out")}
    with serve_in_background(server_config(run_config), tmp_path / "state") as url:
        served = wire.decode(httpx.get(url + "/v1/global", params={"version": 0}).content)

    class NoTraining(LoopbackGrid):  # one node that introduces itself, then trains nothing: the start stays
        def answer(self, message):
            if message.metadata.message_type == "train":
                return Message(Error(code=1, reason="no training in this test"), reply_to=message)
            return _introduction_reply(message, {"name": "a", "profile": {}, "requested_rank": 4, "n_samples": 5})

    run(NoTraining({7: None}), run_config)
    started = wire.decode((tmp_path / "out" / "global-final.safetensors").read_bytes())
    _assert_same_adapter(started, served)
    assert started.meta["global_version"] == 0
    for name, (a, b) in init.lora.items():
        np.testing.assert_array_equal(started.lora[name][0][:2], a)
        np.testing.assert_array_equal(started.lora[name][1][:, :2], b)
    for name, t in init.dense.items():
        np.testing.assert_array_equal(started.dense[name], t)
