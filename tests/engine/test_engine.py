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
