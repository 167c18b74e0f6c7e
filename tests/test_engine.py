"""The round engine (hetlora.engine) under its HTTP transport: an upload's bytes are decoded once between the
route and the stored global, and every domain refusal has one HTTP status.

A real server on loopback with real SQLite state; the expected global is np.average of what the clients sent
(fedavg), not the rule's code.
"""

from __future__ import annotations

import sys

import httpx
import numpy as np
import pytest

from hetlora.protocol import wire
from hetlora.protocol.wire import Adapter, encode

LABELS = ("balance", "card", "transfer")


@pytest.fixture(scope="module")
def spec(tiny_bert_dir):
    from edge_client.models import derive_spec

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


def _introductions(config, docs: dict, caplog) -> tuple[dict, str]:
    """The Flower ServerApp's introduction step over nodes answering `docs` (node id -> introduction): the nodes it
    kept and its log."""
    from flwr.app import Message, RecordDict

    from hetlora.errors import UserError
    from hetlora_flower.records import REPORT, json_record
    from hetlora_flower.server_app import introduce_nodes
    from tests.helpers.flower import LoopbackGrid

    class Introductions(LoopbackGrid):
        def answer(self, message):
            return Message(RecordDict({REPORT: json_record(docs[message.metadata.dst_node_id])}), reply_to=message)

    caplog.clear()
    try:
        nodes = introduce_nodes(Introductions(dict.fromkeys(docs)), config)
    except UserError:  # fewer nodes than min-clients introduced themselves
        nodes = {}
    return nodes, caplog.text


BAD_REGISTRATIONS = [{"n_samples": 0}, {"n_samples": 1001}, {"requested_rank": 0},
                     {"name": "x" * 201}]


@pytest.mark.usefixtures("task_identity")
def test_both_transports_refuse_the_same_bad_registration_with_the_same_message(spec, tmp_path, caplog):
    """One check (hetlora.engine.registration) behind an HTTP registration and a Flower node's introduction: a
    client with no training rows or above the data cap, a rank below 1, a name too long. HTTP answers 400 with the
    message and registers nobody; the ServerApp leaves the node out and logs the same message."""
    from server_stub.background import serve_in_background

    config = _config(spec, max_client_samples=1000)
    good = {"profile": {}, "requested_rank": 4, "n_samples": 1, "name": "dev"}
    with serve_in_background(config, tmp_path / "state") as url, httpx.Client(base_url=url, timeout=30) as http:
        for fields in BAD_REGISTRATIONS:
            reply = http.post("/v1/register", json=good | fields)
            assert reply.status_code == 400, (fields, reply.text)
            message = reply.json()["error"]["message"]
            nodes, logged = _introductions(config, {7: good | fields}, caplog)
            assert nodes == {} and f"node 7 left out: {message}\n" in logged, (fields, message, logged)
        assert http.get("/v1/status").json()["clients"] == []
        assert http.post("/v1/register", json=good).status_code == 201  # the control: one row is enough
    nodes, _ = _introductions(config, {7: good}, caplog)
    assert [(n.name, n.n_samples) for n in nodes.values()] == [("dev", 1)]
