"""Bounded influence of one client (server_stub/aggregation/bounds.py), alone and through the real server.

The poisoning of issue 14: one client uploads factors filled with float32 max (refused at upload), or
with values just inside the absolute limit (accepted, then clipped): for every rule the new global stays
finite and within c times the honest clients' scale, and the status route keeps answering.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from hetlora.protocol.wire import decode, encode
from server_stub.aggregation import RULES, ClientResult, make_rule
from server_stub.aggregation.bounds import CLIP_FACTOR, MAX_ABS_VALUE, bound_influence
from server_stub.aggregation.linalg import update_norm
from tests.test_server import (error_code, global_adapter, make_config, make_update, post_update, register,
                               running_server, snapshot, spec, upload_meta)

__all__ = ["spec"]  # the module-scoped fixture, shared with test_server
RANK = 8


def honest_results(spec, n_clients=3, seed=0):
    return [ClientResult(make_update(spec, RANK, {"client_id": f"c{k}"}, seed=seed + k), n_samples=10 * (k + 1),
                         indices=tuple(range(RANK))) for k in range(n_clients)]


@pytest.mark.parametrize("rule_name", RULES)
def test_honest_round_is_not_clipped_and_aggregates_exactly_as_the_rule(spec, rule_name):
    rule = make_rule(rule_name)
    previous = rule.init_global(spec, RANK, seed=3)
    results = honest_results(spec)
    bounded, clipped = bound_influence(previous, results)
    assert clipped == {} and all(b is r for b, r in zip(bounded, results))
    got, expected = rule.aggregate(previous, bounded), rule.aggregate(previous, results)
    for name in expected.lora:
        for g, e in zip(got.lora[name], expected.lora[name]):
            np.testing.assert_array_equal(g, e)
    for name in expected.dense:
        np.testing.assert_array_equal(got.dense[name], expected.dense[name])


def test_each_bound_clips_only_the_outlier_by_a_scalar(spec):
    previous = make_rule("hetlora").init_global(spec, RANK, seed=3)
    results = honest_results(spec)
    name = next(iter(spec.modules))
    dense_name = next(iter(spec.dense))
    evil = make_update(spec, RANK, {"client_id": "evil"}, seed=9)
    a, b = evil.lora[name]
    evil.lora[name] = (a * 1e3, b)              # A too large
    evil.dense[dense_name] = evil.dense[dense_name] * 1e3
    results.append(ClientResult(evil, n_samples=10**9, indices=tuple(range(RANK))))
    bounded, clipped = bound_influence(previous, results)
    assert list(clipped) == [3]
    assert set(clipped[3]) == {f"{name}.lora_A", f"{name} update", dense_name, "n_samples"}
    assert all(bounded[k] is results[k] for k in range(3))
    a_c, b_c = bounded[3].adapter.lora[name]
    rms = sorted(float(np.linalg.norm(r.adapter.lora[name][0])) for r in results)[1]  # lower median, equal ranks
    assert np.linalg.norm(a_c) == pytest.approx(CLIP_FACTOR * rms, rel=1e-4)
    np.testing.assert_allclose(a_c / np.linalg.norm(a_c), a / np.linalg.norm(a), rtol=1e-4, atol=1e-7)  # direction kept
    norms = sorted(update_norm(*r.adapter.lora[name]) for r in results[:3]) + [update_norm(a_c, b_c)]
    assert norms[-1] <= CLIP_FACTOR * norms[1] * (1 + 1e-5)
    assert bounded[3].n_samples == int(CLIP_FACTOR * 20)  # n = 10, 20, 30, 1e9 -> lower median 20
    delta = bounded[3].adapter.dense[dense_name] - previous.dense[dense_name]
    honest = sorted(np.linalg.norm(r.adapter.dense[dense_name] - previous.dense[dense_name]) for r in results)[1]
    assert np.linalg.norm(delta) == pytest.approx(CLIP_FACTOR * honest, rel=1e-4)


def _factor_bound(uploads, rule_name):
    """Per module: the largest ||B A||_F the new global may have when every client is within the bounds.

    fedavg / hetlora / plora (every client at the global rank, plora indices = all): the global factors are
    convex combinations, so ||B A|| <= max ||B_k|| max ||A_k|| <= (c max_h ||B_h||)(c max_h ||A_h||).
    hlora: dW is a convex combination of the B_k A_k, so ||dW|| <= c max_h ||B_h A_h||."""
    bounds = {}
    for name in uploads[0].lora:
        if rule_name == "hlora":
            bounds[name] = CLIP_FACTOR * max(update_norm(*u.lora[name]) for u in uploads)
        else:
            max_a = max(np.linalg.norm(u.lora[name][0]) for u in uploads)
            max_b = max(np.linalg.norm(u.lora[name][1]) for u in uploads)
            bounds[name] = CLIP_FACTOR ** 2 * max_a * max_b
    return bounds


def at_limit(poison, honest):
    """Every value at the limit, B of the opposite sign, a huge sample count."""
    for name, (a, b) in poison.lora.items():
        poison.lora[name] = (np.full_like(a, MAX_ABS_VALUE), np.full_like(b, -MAX_ABS_VALUE))
    poison.dense = {k: np.full_like(v, MAX_ABS_VALUE) for k, v in poison.dense.items()}
    return 2**31 - 1


def unbalanced(poison, honest):
    """B at the limit, A tiny: an ordinary B A, but factors that a factor average (fedavg, hetlora) multiplies
    with the honest clients' A."""
    for name, (a, b) in poison.lora.items():
        poison.lora[name] = (a * 1e-4, np.sign(b) * MAX_ABS_VALUE)
    return 10


def scaled_flip(poison, honest):
    """The honest mean update reversed and scaled up 1000x (values stay under the limit)."""
    for name in poison.lora:
        poison.lora[name] = (honest[0].lora[name][0] * 1000, -honest[0].lora[name][1] * 1000)
    poison.dense = {k: -1000 * v for k, v in honest[0].dense.items()}
    return 10


def sample_count(poison, honest):
    """An ordinary-looking update claiming 2^31 - 1 samples, to take the n-weighted share."""
    return 2**31 - 1


ATTACKS = {f.__name__: f for f in (at_limit, unbalanced, scaled_flip, sample_count)}


@pytest.mark.parametrize("rule_name", RULES)
def test_float32_max_factors_are_refused_at_upload(spec, tmp_path, rule_name):
    state = tmp_path / "state"
    config = make_config(spec, aggregator=rule_name, ranks=(RANK,), global_rank=RANK, min_clients=2)
    with running_server(config, state) as http:
        clients = [register(http, RANK) for _ in range(2)]
        meta = upload_meta(clients[1], 1, RANK, 10, indices=list(range(RANK)) if rule_name == "plora" else None)
        poison = make_update(spec, RANK, meta, seed=5)
        for name, (a, b) in poison.lora.items():
            poison.lora[name] = (np.full_like(a, np.finfo(np.float32).max), np.full_like(b, np.finfo(np.float32).max))
        before = snapshot(http, state)
        reply = post_update(http, clients[1], 1, encode(poison))
        assert (reply.status_code, error_code(reply)) == (400, "value_too_large"), reply.text
        assert snapshot(http, state) == before


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("rule_name", RULES)
def test_one_poisoner_cannot_move_the_global_beyond_the_bound(spec, tmp_path, rule_name, attack):
    state = tmp_path / "state"
    config = make_config(spec, aggregator=rule_name, ranks=(RANK,), global_rank=RANK, min_clients=4, rounds=2)
    with running_server(config, state) as http:
        clients = [register(http, RANK) for _ in range(4)]
        indices = list(range(RANK)) if rule_name == "plora" else None
        metas = [upload_meta(c, 1, RANK, 10 * (k + 1), indices=indices) for k, c in enumerate(clients)]
        honest = [make_update(spec, RANK, meta, seed=k) for k, meta in enumerate(metas[:3])]
        poison = make_update(spec, RANK, metas[3], seed=5)
        poison.meta = {**metas[3], "n_samples": ATTACKS[attack](poison, honest)}
        for client, update in zip(clients, honest + [poison]):
            assert post_update(http, client, 1, encode(update)).status_code == 201
        status = http.get("/v1/status")
        assert status.status_code == 200
        statistics = status.json()["history"][0]["statistics"]
        assert list(statistics["clipped"]) == [clients[3]["client_id"]]
        assert statistics["sample_weights"][3] <= CLIP_FACTOR / (CLIP_FACTOR + 3)  # n_4 <= c x lower median
        new = global_adapter(http)
        for name, bound in _factor_bound(honest, rule_name).items():
            a, b = new.lora[name]
            assert np.isfinite(a).all() and np.isfinite(b).all()
            assert update_norm(a, b) <= bound * (1 + 1e-4), name
        previous = decode(http.get("/v1/global", params={"version": 0}).content)
        for name, value in new.dense.items():  # a convex combination of changes, each within c x the median
            assert np.isfinite(value).all()
            honest_change = max(np.linalg.norm(u.dense[name] - previous.dense[name]) for u in honest)
            assert np.linalg.norm(value - previous.dense[name]) <= CLIP_FACTOR * honest_change * (1 + 1e-4), name


def test_status_answers_when_a_stored_statistic_is_not_finite(spec, tmp_path):
    state = tmp_path / "state"
    with running_server(make_config(spec, min_clients=2, rounds=2), state) as http:
        clients = [register(http, 2), register(http, 4)]
        for k, c in enumerate(clients):
            update = make_update(spec, c["rank"], upload_meta(c, 1, c["rank"], 10), seed=k)
            assert post_update(http, c, 1, encode(update)).status_code == 201
        with sqlite3.connect(state / "state.sqlite") as db:  # a row written before the fix: NaN in the JSON
            stored = json.loads(db.execute("SELECT statistics FROM rounds WHERE number = 1").fetchone()[0])
            stored["mean_delta_norm"] = float("nan")
            stored["update_norms"] = [float("inf"), 1.0]
            db.execute("UPDATE rounds SET statistics = ? WHERE number = 1", (json.dumps(stored),))
        reply = http.get("/v1/status")
        assert reply.status_code == 200, reply.text
        statistics = reply.json()["history"][0]["statistics"]
        assert statistics["mean_delta_norm"] is None and statistics["update_norms"] == [None, 1.0]
