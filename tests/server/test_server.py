"""The aggregation server over real HTTP (uvicorn on loopback) with real SQLite state.

Uploads are built with numpy (no training). Aggregated globals are checked against dense
references (tests/helpers/server.py, from the papers' formulas in docs/PROTOCOL.md and the rule docstrings), not
against the rule code.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as st_save

from hetlora.protocol.wire import Adapter, decode, encode
from hetlora.errors import UserError
from hetlora.engine.errors import Conflict
from hetlora.engine.upload_checks import update_digest
from tests.helpers.server import (LABELS, assert_matches_reference, error_code, global_adapter, make_config,
                                  make_update, post_update, reference_global, register, running_server, sigkill,
                                  snapshot, start_cli_server, upload_meta, wait_for)


# --- the happy path, every rule --------------------------------------------------------------------
@pytest.mark.parametrize("rule, requested, ranks, global_rank", [
    ("hetlora", (2, 4, 8), (2, 4, 8), 8),
    ("hlora", (2, 4, 8), (2, 4, 8), 16),  # sum of client ranks <= R: the global dW is exact
    ("plora", (2, 4, 8), (2, 4, 8), 8),
    ("fedavg", (2, 4, 8), (2, 4, 8), 8),  # homogeneous: every client gets the global rank
])
def test_three_clients_round_matches_dense_reference(spec, tmp_path, rule, requested, ranks, global_rank):
    from hetlora.engine.aggregation import make_rule

    config = make_config(spec, aggregator=rule, ranks=ranks, global_rank=global_rank)
    initial = make_rule(rule).init_global(spec, global_rank, config.seed)
    with running_server(config, tmp_path / "state") as http:
        clients = [register(http, r, name=f"dev{r}") for r in requested]
        assert [c["rank"] for c in clients] == ([global_rank] * 3 if rule == "fedavg" else list(requested))
        assert clients[0]["run"]["labels"] == list(LABELS)
        assert clients[0]["run"]["spec_fingerprint"] == spec.fingerprint
        uploads = []
        for k, client in enumerate(clients):
            info = http.get("/v1/round", headers=client["auth"]).json()
            assert (info["round"], info["state"], info["selected"], info["uploaded"]) == (1, "open", True, False)
            rank, indices = info["rank"], info["indices"]
            view = decode(http.get("/v1/rounds/1/adapter", headers=client["auth"]).content)
            assert (view.meta["round"], view.meta["rank"], view.meta["indices"]) == (1, rank, indices)
            shown = global_rank if rule in ("plora", "fedavg") else rank  # plora folds the rest: full global
            for name, (a, b) in view.lora.items():
                np.testing.assert_array_equal(a, initial.lora[name][0][:shown])
                np.testing.assert_array_equal(b, initial.lora[name][1][:, :shown])
            if rule == "plora":
                assert len(indices) == rank and len(set(indices)) == rank
            else:
                assert indices is None
            n_k = 10 * (k + 1)
            update = make_update(spec, rank, upload_meta(client, 1, rank, n_k, indices=indices), seed=k)
            reply = post_update(http, client, 1, encode(update))
            assert reply.status_code == 201, reply.text
            assert reply.json()["round_state"] == ("aggregated" if k == 2 else "open")
            uploads.append((update, n_k, indices))

        got = global_adapter(http)
        assert got.meta["global_version"] == 1
        assert_matches_reference(rule, got, reference_global(rule, initial, uploads))
        status = http.get("/v1/status").json()
        assert status["round"]["number"] == 2 and status["round"]["state"] == "open"
        (entry,) = status["history"]
        assert entry["round"] == 1 and sorted(entry["clients"]) == sorted(c["client_id"] for c in clients)
        assert entry["statistics"]["total_samples"] == 60
        assert entry["statistics"]["sample_weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])


# --- strictness ------------------------------------------------------------------------------------
def test_bad_uploads_get_4xx_and_store_nothing(spec, tmp_path):
    state = tmp_path / "state"
    config = make_config(spec, min_clients=2, max_upload_mb=0.05)  # 52 kB; a rank-8 update is about 9 kB
    with running_server(config, state) as http:
        small, large = register(http, 2), register(http, 8)
        meta = upload_meta(small, 1, 2, 10)
        good = make_update(spec, 2, meta, seed=1)
        first_module = next(iter(spec.modules))
        nan = make_update(spec, 2, meta, seed=1)
        nan.lora[first_module][0][0, 0] = np.nan
        inf_dense = make_update(spec, 2, meta, seed=1)
        next(iter(inf_dense.dense.values())).flat[0] = np.inf
        wrong_shape = make_update(spec, 2, meta, seed=1)
        a, b = wrong_shape.lora[first_module]
        wrong_shape.lora[first_module] = (a[:, :-1], b)
        half = {k: v.astype(np.float16) for k, v in _tensors(good).items()}
        float16 = st_save(half, metadata={"format": "hetlora-adapter", "format_version": "1", "meta": json.dumps(meta)})
        no_effective = {k: v for k, v in meta.items() if k != "effective_rank"}

        cases = [
            ("no token", {}, encode(good), 401, "missing_token"),
            ("wrong token", {"Authorization": "Bearer nope"}, encode(good), 401, "bad_token"),
            ("not safetensors", None, b"\x80\x04not a safetensors file, maybe a pickle" * 4, 400, "not_safetensors"),
            ("too large", None, b"\0" * 60_000, 413, "too_large"),
            ("unknown module", None, encode(make_update(spec, 2, meta, 1, module_names=[*spec.modules, "bert.evil"])),
             400, "unknown_module"),
            ("wrong shape", None, encode(wrong_shape), 400, "bad_shape"),
            ("rank above assigned", None, encode(make_update(spec, 4, {**meta, "effective_rank": 4}, 1)), 400,
             "rank_too_high"),
            ("NaN", None, encode(nan), 400, "not_finite"),
            ("Inf in dense", None, encode(inf_dense), 400, "not_finite"),
            ("float16", None, float16, 400, "bad_dtype"),
            ("meta round differs", None, encode(make_update(spec, 2, {**meta, "round": 2}, 1)), 400, "bad_metadata"),
            ("no effective_rank", None, encode(make_update(spec, 2, no_effective, 1)), 400, "bad_metadata"),
            ("effective_rank lies", None, encode(make_update(spec, 2, {**meta, "effective_rank": 1}, 1)), 400,
             "rank_mismatch"),
            ("someone else's id", None, encode(make_update(spec, 2, {**meta, "client_id": large["client_id"]}, 1)),
             400, "client_mismatch"),
        ]
        before = snapshot(http, state)
        for label, headers, body, status, code in cases:
            reply = http.post("/v1/rounds/1/update", content=body,
                              headers=small["auth"] if headers is None else headers)
            assert (reply.status_code, error_code(reply)) == (status, code), label
            assert reply.json()["error"]["message"], label
        # streamed body without Content-Length: the size limit still holds
        chunks = iter([b"\0" * 20_000] * 4)
        reply = http.post("/v1/rounds/1/update", content=chunks, headers=small["auth"])
        assert (reply.status_code, error_code(reply)) == (413, "too_large")
        for n in (0, 2):
            reply = post_update(http, small, n, encode(make_update(spec, 2, {**meta, "round": n}, 1)))
            assert (reply.status_code, error_code(reply), reply.json()["error"]["current_round"]) == \
                (409, "round_not_open", 1)
        reply = http.post("/v1/register", json={"profile": {}, "requested_rank": "lots"})
        assert (reply.status_code, error_code(reply)) == (400, "bad_request")
        assert snapshot(http, state) == before

        # the good upload is accepted; the identical bytes again are idempotent; different bytes are refused
        assert post_update(http, small, 1, encode(good)).status_code == 201
        after_good = snapshot(http, state)
        again = post_update(http, small, 1, encode(good))
        assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
        assert again.json()["sha256"] == update_digest(good)
        reply = post_update(http, small, 1, encode(make_update(spec, 2, meta, seed=2)))
        assert (reply.status_code, error_code(reply)) == (409, "duplicate_upload")
        assert snapshot(http, state) == after_good

        # the round closes; a late upload for it is 409 with the current round
        update = make_update(spec, 8, upload_meta(large, 1, 8, 30), seed=3)
        assert post_update(http, large, 1, encode(update)).json()["round_state"] == "aggregated"
        late = post_update(http, small, 1, encode(make_update(spec, 2, meta, seed=4)))
        assert (late.status_code, error_code(late), late.json()["error"]["current_round"]) == (409, "round_closed", 2)


def _tensors(adapter: Adapter) -> dict:
    out = {}
    for name, (a, b) in adapter.lora.items():
        out[name + ".lora_A"], out[name + ".lora_B"] = a, b
    return out | adapter.dense


def test_plora_upload_must_carry_the_assigned_indices(spec, tmp_path):
    state = tmp_path / "state"
    with running_server(make_config(spec, aggregator="plora", min_clients=2), state) as http:
        client, _ = register(http, 4), register(http, 4)
        indices = http.get("/v1/round", headers=client["auth"]).json()["indices"]
        others = [j for j in range(8) if j not in indices]
        before = snapshot(http, state)
        for bad in (others[:4], None, list(reversed(indices)) if indices != sorted(indices, reverse=True) else others[:4]):
            update = make_update(spec, 4, upload_meta(client, 1, 4, 10, indices=bad), seed=0)
            reply = post_update(http, client, 1, encode(update))
            assert (reply.status_code, error_code(reply)) == (400, "wrong_indices"), bad
        assert snapshot(http, state) == before


# --- selection, self-pruning, profile, finish ------------------------------------------------------
def test_selection_pruning_profile_and_finish(spec, tmp_path):
    from hetlora.engine.selection import select_clients

    config = make_config(spec, min_clients=2, clients_per_round=2, rounds=2, ranks=(2, 4, 8))
    with running_server(config, tmp_path / "state") as http:
        paths = set(http.get("/openapi.json").json()["paths"])
        assert {"/v1/register", "/v1/round", "/v1/profile", "/v1/rounds/{n}/adapter", "/v1/rounds/{n}/update",
                "/v1/global", "/v1/status", "/v1/run"} <= paths
        assert error_code(http.get("/v1/nothing-here")) == "not_found"
        waiting = register(http, 8)
        assert http.get("/v1/round", headers=waiting["auth"]).json()["state"] == "waiting"
        clients = [waiting, register(http, 8), register(http, 4)]  # round 1 opens with the first two
        ids = [c["client_id"] for c in clients]
        for number in (1, 2):
            status = http.get("/v1/status").json()
            registered = sorted(ids[:2] if number == 1 else ids)  # unnamed clients are ordered by id
            assert status["round"]["selected"] == select_clients(registered, 2, config.seed, number)
            unselected_first = sorted(clients, key=lambda c: c["client_id"] in status["round"]["selected"])
            for client in unselected_first:
                info = http.get("/v1/round", headers=client["auth"]).json()
                assert info["round"] == number
                if client["client_id"] not in status["round"]["selected"]:
                    assert info["selected"] is False
                    reply = http.get(f"/v1/rounds/{number}/adapter", headers=client["auth"])
                    assert (reply.status_code, error_code(reply)) == (403, "not_selected")
                    continue
                rank = info["rank"]
                effective = rank - 1 if number == 1 else rank  # self-pruned in round 1
                update = make_update(spec, effective, upload_meta(client, number, rank, 5, effective), seed=number)
                reply = post_update(http, client, number, encode(update))
                assert reply.status_code == 201, reply.text
                assert reply.json()["next_rank"] == effective
        for client in clients:
            assert http.get("/v1/round", headers=client["auth"]).json()["state"] == "finished"
        status = http.get("/v1/status").json()
        assert status["finished"] is True and len(status["history"]) == 2
        pruned = {c["client_id"]: c["pruned_rank"] for c in status["clients"]}
        for entry in status["history"][:1]:
            for cid in entry["clients"]:
                assert pruned[cid] == entry["ranks"][cid] - 1
        # a fresh profile never lifts a client above the rank it pruned itself to
        some = next(c for c in clients if pruned[c["client_id"]])
        reply = http.post("/v1/profile", json={"profile": {"device": "bigger"}, "requested_rank": 64},
                          headers=some["auth"])
        assert reply.json()["rank"] == pruned[some["client_id"]]
        unpruned = next((c for c in clients if not pruned[c["client_id"]]), None)
        if unpruned is not None:
            reply = http.post("/v1/profile", json={"profile": {}, "requested_rank": 3}, headers=unpruned["auth"])
            assert reply.json()["rank"] == 2


def test_concurrent_uploads_aggregate_exactly_once(spec, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with running_server(make_config(spec, min_clients=4, rounds=1), tmp_path / "state") as http:
        clients = [register(http, r) for r in (2, 4, 8, 8)]
        bodies = [encode(make_update(spec, c["rank"], upload_meta(c, 1, c["rank"], 5), seed=k))
                  for k, c in enumerate(clients)]
        with ThreadPoolExecutor(len(clients)) as pool:
            replies = list(pool.map(lambda cb: post_update(http, cb[0], 1, cb[1]), zip(clients, bodies)))
        assert [r.status_code for r in replies] == [201] * 4
        assert sorted(r.json()["round_state"] for r in replies) == ["aggregated", "open", "open", "open"]
        status = http.get("/v1/status").json()
        assert status["finished"] and len(status["history"]) == 1 and len(status["history"][0]["clients"]) == 4


def test_deadline_extends_then_aggregates_with_min_uploads(spec, tmp_path):
    config = make_config(spec, min_clients=2, round_deadline=0.6)
    with running_server(config, tmp_path / "state") as http:
        clients = [register(http, r) for r in (2, 4, 8)]

        def upload(client, seed):
            rank = client["rank"]
            return post_update(http, client, 1, encode(make_update(spec, rank, upload_meta(client, 1, rank, 10), seed)))

        assert upload(clients[0], 0).status_code == 201
        status = wait_for(http, lambda s: "only 1 of the 2 required uploads" in (s["round"]["extension_reason"] or ""))
        assert status["round"]["number"] == 1 and status["round"]["state"] == "open"
        assert status["round"]["extensions"] >= 1
        assert upload(clients[1], 1).status_code == 201
        status = wait_for(http, lambda s: s["history"])
        assert status["history"][0]["clients"] == [clients[0]["client_id"], clients[1]["client_id"]]
        assert status["history"][0]["extensions"] >= 1
        late = upload(clients[2], 2)
        assert (late.status_code, error_code(late), late.json()["error"]["current_round"]) == (409, "round_closed", 2)


# --- durability ------------------------------------------------------------------------------------
def test_crash_mid_aggregation_keeps_previous_state(spec, tmp_path):
    from server_stub.app import build_coordinator

    config = make_config(spec, min_clients=2)
    coordinator = build_coordinator(config, tmp_path)
    clients = [coordinator.register({}, r, 10) for r in (4, 8)]
    coordinator.accept_upload(clients[0]["client_id"], 1,
                              encode(make_update(spec, 4, upload_meta(clients[0], 1, 4, 10), seed=0)))
    real_update = coordinator.store.update

    def crash_when_closing(table, where, values):
        if values.get("state") == "aggregated":
            raise RuntimeError("simulated crash")
        real_update(table, where, values)

    coordinator.store.update = crash_when_closing
    with pytest.raises(RuntimeError, match="simulated crash"):
        coordinator.accept_upload(clients[1]["client_id"], 1,
                                  encode(make_update(spec, 8, upload_meta(clients[1], 1, 8, 10), seed=1)))
    status = coordinator.status()
    assert (status["global_version"], status["round"]["number"], status["round"]["state"]) == (0, 1, "open")
    assert len(status["round"]["uploads"]) == 2 and not status["history"]
    coordinator.store.close()

    restarted = build_coordinator(config, tmp_path)  # finds every upload in and aggregates
    status = restarted.status()
    assert (status["global_version"], status["round"]["number"], len(status["history"])) == (1, 2, 1)
    restarted.store.close()


def test_requests_are_answered_while_a_round_aggregates(spec, tmp_path):
    """The rule runs outside the coordinator's lock: status and round polls answer, uploads for the round are refused."""
    import threading

    from hetlora.engine.aggregation import make_rule
    from server_stub.rounds import Coordinator
    from server_stub.store import Store

    class HeldRule:
        """The real hetlora rule whose aggregate waits until the test releases it."""

        def __init__(self):
            self.inner, self.entered, self.release = make_rule("hetlora"), threading.Event(), threading.Event()

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def aggregate(self, global_, results):
            self.entered.set()
            assert self.release.wait(30)
            return self.inner.aggregate(global_, results)

    rule = HeldRule()
    coordinator = Coordinator(make_config(spec, min_clients=2), Store(tmp_path), rule)
    clients = [coordinator.register({}, r, 10) for r in (4, 8)]
    bodies = [encode(make_update(spec, c["rank"], upload_meta(c, 1, c["rank"], 10), seed=k))
              for k, c in enumerate(clients)]
    coordinator.accept_upload(clients[0]["client_id"], 1, bodies[0])
    closing = threading.Thread(target=coordinator.accept_upload, args=(clients[1]["client_id"], 1, bodies[1]))
    closing.start()
    assert rule.entered.wait(30)
    assert coordinator.status()["round"]["aggregating"] is True
    assert coordinator.round_for(clients[0]["client_id"])["uploaded"] is True
    with pytest.raises(Conflict) as refused:
        coordinator.accept_upload(clients[0]["client_id"], 1,
                                  encode(make_update(spec, 4, upload_meta(clients[0], 1, 4, 10), seed=9)))
    assert refused.value.code == "round_closed"
    rule.release.set()
    closing.join(30)
    status = coordinator.status()
    assert len(status["history"]) == 1 and status["round"]["number"] == 2 and not status["round"]["aggregating"]
    coordinator.store.close()


def test_state_dir_of_another_run_is_refused(spec, tmp_path):
    from server_stub.app import build_coordinator

    build_coordinator(make_config(spec), tmp_path).store.close()
    with pytest.raises(UserError, match="aggregator"):
        build_coordinator(make_config(spec, aggregator="hlora"), tmp_path)
    with pytest.raises(UserError, match="labels"):
        build_coordinator(make_config(spec, labels=("x", "y", "z")), tmp_path)


def test_sigkill_and_restart_continue_the_open_round(spec, tiny_bert_dir, tmp_path):
    """Round 1 completes; round 2 gets two of three uploads; SIGKILL; restart; the third completes round 2."""
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n")
    state = tmp_path / "state"

    def updates_for(clients, number):
        return [make_update(spec, c["rank"], upload_meta(c, number, c["rank"], 10 * (k + 1)), seed=10 * number + k)
                for k, c in enumerate(clients)]

    proc, url = start_cli_server(tiny_bert_dir, labels_file, state)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            clients = [register(http, r) for r in (2, 4, 8)]
            for client, update in zip(clients, updates_for(clients, 1)):
                assert post_update(http, client, 1, encode(update)).status_code == 201
            global_1 = global_adapter(http)
            updates = updates_for(clients, 2)
            for client, update in zip(clients[:2], updates[:2]):
                assert post_update(http, client, 2, encode(update)).status_code == 201
            before = http.get("/v1/status").json()
    finally:
        sigkill(proc)

    proc, url = start_cli_server(tiny_bert_dir, labels_file, state)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            after = http.get("/v1/status").json()
            for key in ("round", "clients", "history", "global_version"):
                assert after[key] == before[key], key
            assert after["round"]["uploads"] == [c["client_id"] for c in clients[:2]]
            again = post_update(http, clients[0], 2, encode(updates[0]))  # the token survives; idempotent
            assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
            retry = post_update(http, clients[0], 1, encode(updates_for(clients, 1)[0]))  # reply lost, say
            assert (retry.status_code, retry.json()["duplicate"], retry.json()["round_state"]) == (200, True, "aggregated")
            late = post_update(http, clients[0], 1, encode(updates[0]))
            assert (late.status_code, error_code(late), late.json()["error"]["current_round"]) == (409, "round_closed", 2)
            assert post_update(http, clients[2], 2, encode(updates[2])).json()["round_state"] == "aggregated"
            status = http.get("/v1/status").json()
            assert status["finished"] is True and [h["round"] for h in status["history"]] == [1, 2]
            assert status["history"][1]["clients"] == [c["client_id"] for c in clients]
            expected = reference_global("hetlora", global_1, [(u, 10 * (k + 1), None) for k, u in enumerate(updates)])
            assert_matches_reference("hetlora", global_adapter(http), expected)
    finally:
        sigkill(proc)


def test_the_first_round_waits_for_start_clients_then_selects_among_them_all(spec, tmp_path):
    """--start-clients: round 1 (no head round) opens only once that many clients registered, and its selection is
    the seed's choice among every one of them, not among the first --min-clients to arrive."""
    from hetlora.engine.selection import select_clients

    config = make_config(spec, min_clients=2, clients_per_round=2, start_clients=4, rounds=1)
    with running_server(config, tmp_path / "state") as http:
        clients = [register(http, 8) for _ in range(3)]
        assert http.get("/v1/round", headers=clients[0]["auth"]).json()["state"] == "waiting"
        clients.append(register(http, 8))
        status = http.get("/v1/status").json()
        assert status["round"]["number"] == 1
        assert status["round"]["selected"] == select_clients(sorted(c["client_id"] for c in clients), 2, config.seed, 1)
