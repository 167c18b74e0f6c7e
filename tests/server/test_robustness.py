"""Bad input never gets a 5xx and never changes state: the malformed requests of issue 14, one by one,
then bounded property-based fuzzing (hypothesis) of every route of the server's OpenAPI document."""

from __future__ import annotations

import json
import sqlite3
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from hetlora.protocol.wire import encode
from tests.helpers.server import (error_code, make_config, make_update, post_update, register, running_server, snapshot,
                                  upload_meta)

HUGE = (2**63, 2**64, 2**70)


def raw_safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    header = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(header).to_bytes(8, "little") + header + data


def metadata(meta) -> dict:
    return {"format": "hetlora-adapter", "format_version": "1", "meta": meta}


def tensors_of(adapter) -> dict:
    out = {}
    for name, (a, b) in adapter.lora.items():
        out[name + ".lora_A"], out[name + ".lora_B"] = a, b
    return out | adapter.dense


def profile_doc(**sections) -> dict:
    return {"schema": "hetlora-profile", "version": 1, **sections}


def test_malformed_requests_of_issue_14_get_4xx_and_store_nothing(spec, tmp_path):
    state = tmp_path / "state"
    with running_server(make_config(spec, min_clients=2), state) as http:
        client, other = register(http, 2), register(http, 4)
        meta = upload_meta(client, 1, 2, 10)
        good = make_update(spec, 2, meta, seed=1)
        zero_d = tensors_of(good)
        zero_d[next(iter(spec.modules)) + ".lora_A"] = np.array(1.0, dtype=np.float32)
        deep = b"[" * 100_000 + b"]" * 100_000
        shallow = b"[" * 5_000 + b"]" * 5_000  # deeper than Python's recursion limit, inside the header limit
        reg = {"profile": {}, "requested_rank": 4, "n_samples": 1}
        uploads = [
            ("header nested 100k deep: over the run's largest upload", raw_safetensors(b'{"a":' + deep + b"}"), 413,
             "too_large"),
            ("header nested 5k deep", raw_safetensors(b'{"a":' + shallow + b"}"), 400, "not_safetensors"),
            ("__metadata__ is a list", raw_safetensors({"__metadata__": ["x"]}), 400, "bad_metadata"),
            ("__metadata__ is a string", raw_safetensors({"__metadata__": "x"}), 400, "bad_metadata"),
            ("meta is an int", raw_safetensors({"__metadata__": metadata(5)}), 400, "bad_metadata"),
            ("meta nested 5k deep", raw_safetensors({"__metadata__": metadata(shallow.decode())}), 400,
             "bad_metadata"),
            ("0-d lora_A", st_save(zero_d, metadata=metadata(json.dumps(meta))), 400, "bad_shape"),
            *[(f"n_samples = {n}", encode(make_update(spec, 2, {**meta, "n_samples": n}, 1)), 400, "bad_metadata")
              for n in HUGE],
            ("rank = 2^64", encode(make_update(spec, 2, {**meta, "rank": 2**64}, 1)), 400, "bad_metadata"),
        ]
        before = snapshot(http, state)
        for label, body, status, code in uploads:
            reply = post_update(http, client, 1, body)
            assert (reply.status_code, error_code(reply)) == (status, code), (label, reply.text)
        inf_profile = '{"profile": %s, "requested_rank": 4, "n_samples": 1}'
        requests = [
            ("round 2^63 in the URL (upload)", "POST", f"/v1/rounds/{2**63}/update", {"content": encode(good)}),
            ("round 2^63 in the URL (download)", "GET", f"/v1/rounds/{2**63}/adapter", {}),
            ("?version=2^63", "GET", "/v1/global", {"params": {"version": 2**63}}),
            *[(f"register requested_rank {n}", "POST", "/v1/register", {"json": {**reg, "requested_rank": n}})
              for n in HUGE],
            *[(f"register n_samples {n}", "POST", "/v1/register", {"json": {**reg, "n_samples": n}}) for n in HUGE],
            ("profile requested_rank 2^70", "POST", "/v1/profile", {"json": {"profile": {}, "requested_rank": 2**70}}),
            ("random bytes at register", "POST", "/v1/register", {"content": bytes(range(256)) * 4}),
            ("register is a list", "POST", "/v1/register", {"json": [1, 2]}),
            ("profile nested deep", "POST", "/v1/register", {"content": b'{"profile": {"a": ' + deep[:20_000] +
                                                                        b'}, "requested_rank": 4, "n_samples": 1}'}),
            ("name of 10 kB", "POST", "/v1/register", {"json": {**reg, "name": "x" * 10_000}}),
            ("round -1", "GET", "/v1/rounds/-1/adapter", {}),
        ]
        for label, method, url, kwargs in requests:
            reply = http.request(method, url, headers=client["auth"], **kwargs)
            assert (reply.status_code, error_code(reply)) == (400, "bad_request"), (label, reply.text)
        bad_profiles = [
            ("usable_bytes = Infinity", '{"memory": {"usable_bytes": Infinity}}'),
            ("usable_bytes = NaN", '{"memory": {"usable_bytes": NaN}}'),
            ("usable_bytes = 1e400 as an int", '{"memory": {"usable_bytes": 1%s}}' % ("0" * 400)),
            ("throttle_reasons = [1, 2]", '{"cpu": {"throttled": true, "throttle_reasons": [1, 2]}}'),
            ("throttle_reasons = 7", '{"cpu": {"throttled": true, "throttle_reasons": 7}}'),
        ]
        for label, sections in bad_profiles:
            doc = json.dumps(profile_doc())[:-1] + ", " + sections[1:]
            for url in ("/v1/register", "/v1/profile"):
                reply = http.post(url, content=inf_profile % doc, headers={**client["auth"],
                                                                           "Content-Type": "application/json"})
                assert (reply.status_code, error_code(reply)) == (400, "bad_profile"), (label, url, reply.text)
        big = {"json": {**reg, "profile": {"blob": "x" * 400_000}}}
        for label, kwargs in [("1 MB JSON register", big),
                              ("streamed JSON register", {"content": iter([b"{" + b" " * 100_000] * 4)})]:
            reply = http.post("/v1/register", **kwargs)
            assert (reply.status_code, error_code(reply)) == (413, "too_large"), label
        reply = http.post("/v1/profile", json=big["json"], headers=client["auth"])
        assert (reply.status_code, error_code(reply)) == (413, "too_large")
        assert snapshot(http, state) == before
        # the server still works: both uploads complete the round
        assert post_update(http, client, 1, encode(good)).status_code == 201
        update = make_update(spec, 4, upload_meta(other, 1, 4, 10), seed=2)
        assert post_update(http, other, 1, encode(update)).json()["round_state"] == "aggregated"


# --- property-based fuzzing of every OpenAPI route ------------------------------------------------------------
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) |
                          st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
ROUND = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.text(max_size=12))
PROFILE = st.one_of(JSON_VALUE, st.fixed_dictionaries({
    "schema": st.just("hetlora-profile"), "version": st.sampled_from([1, 2, "1"]),
    "memory": st.one_of(JSON_VALUE, st.dictionaries(st.sampled_from(["usable_bytes", "available_bytes",
                                                                     "cgroup_limit_bytes"]), JSON_LEAF)),
    "cpu": st.one_of(JSON_VALUE, st.dictionaries(st.sampled_from(["throttled", "throttle_reasons"]), JSON_VALUE)),
    "battery": JSON_VALUE, "compute": JSON_VALUE, "identity": JSON_VALUE}))


def body_for(schema: dict | None, components: dict):
    """A JSON body near the route's request schema: its properties with values of any JSON type, or raw bytes."""
    if schema is None:
        return st.one_of(st.binary(max_size=300), st.builds(raw_safetensors, st.dictionaries(st.text(max_size=8),
                                                                                                JSON_VALUE, max_size=3)))
    ref = schema.get("$ref", "").rsplit("/", 1)[-1]
    props = components.get(ref, {}).get("properties", {})
    values = {name: (PROFILE if name == "profile" else st.one_of(JSON_LEAF, st.integers(-5, 70), JSON_VALUE))
              for name in props}
    return st.one_of(st.fixed_dictionaries({}, optional=values).map(lambda d: json.dumps(d).encode()),
                     JSON_VALUE.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200))


@pytest.mark.slow
def test_fuzz_every_openapi_route_never_answers_5xx(spec, tmp_path):
    with running_server(make_config(spec, min_clients=2, rounds=3), tmp_path / "state") as http:
        clients = [register(http, 2), register(http, 4)]
        doc = http.get("/openapi.json").json()
        components = doc.get("components", {}).get("schemas", {})
        routes = [(path, method.upper(), op) for path, item in doc["paths"].items() for method, op in item.items()]
        assert {p for p, _, _ in routes} >= {"/v1/register", "/v1/profile", "/v1/round", "/v1/run", "/v1/status",
                                             "/v1/global", "/v1/rounds/{n}/adapter", "/v1/rounds/{n}/update"}
        auth = st.sampled_from([c["auth"] for c in clients] + [{}, {"Authorization": "Bearer nope"},
                                                               {"Authorization": "Basic x"}])
        seen = []

        def fuzz(path, method, body):
            query = st.dictionaries(st.sampled_from(["version", "x"]), st.one_of(ROUND, st.just("")), max_size=2)

            @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(n=ROUND, content=body, params=query, headers=auth)
            def hit(n, content, params, headers):
                url = path.replace("{n}", quote(str(n), safe=""))
                reply = http.request(method, url, content=content, params=params, headers=headers)
                seen.append(reply.status_code)
                assert reply.status_code < 500, (method, url, params, content[:200], reply.text)
                if reply.status_code >= 400:
                    assert error_code(reply), reply.text

            hit()

        for path, method, op in routes:
            body_schema = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
            fuzz(path, method, body_for(body_schema, components) if method == "POST" else st.just(b""))
        print(f"fuzzing: {len(seen)} requests over {len(routes)} routes, statuses {sorted(set(seen))}")
        assert len(seen) >= 8 * 30 and max(seen) < 500


def test_an_upload_whose_row_fails_leaves_no_blob(spec, tmp_path):
    from server_stub.app import build_coordinator

    coordinator = build_coordinator(make_config(spec, min_clients=2), tmp_path)
    client, _ = coordinator.register({}, 2, 10), coordinator.register({}, 4, 10)
    real_insert = coordinator.store.insert

    def failing_insert(table, row):
        if table == "uploads":
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        real_insert(table, row)

    coordinator.store.insert = failing_insert
    update = make_update(spec, 2, upload_meta(client, 1, 2, 10), seed=0)
    with pytest.raises(sqlite3.OperationalError):
        coordinator.accept_upload(client["client_id"], 1, encode(update))
    assert not [p for p in (tmp_path / "blobs" / "uploads").rglob("*") if p.is_file()]
    coordinator.store.close()
