"""Bounded influence of one client (hetlora/engine/aggregation/bounds.py), alone and through the real server.

Updates are measured from where each client started (its view of the previous global), against a reference
anchored at the first round's lower median, with a floor and a ceiling. Issue 14's poisoners (float32 max,
values at the limit, huge sample counts) and issue 26's (a x100 model-replacement attacker over 10 rounds, a
x1e-12 client that would become the reference) are replayed here.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from hetlora.protocol.wire import Adapter, decode, encode
from hetlora.engine.aggregation import RULES, ClientResult, make_rule
from hetlora.engine.aggregation.bounds import (CEILING_RATIO, CLIP_FACTOR, FACTOR_CLIP, FLOOR_RATIO, MAX_ABS_VALUE,
                                           bound_influence)
from hetlora.engine.aggregation.linalg import update_norm
from hetlora.engine.aggregation.pipeline import aggregate_round
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.settings import TrainingSettings
from tests.helpers.adapters import changed, moved
from tests.helpers.server import (assert_matches_reference, error_code, global_adapter, make_config, make_update,
                                  post_update, reference_global, register, running_server, snapshot, upload_meta)

RANK = 8
PLAN = ClientPlan(round=1, rank=RANK, mode="plain", training=TrainingSettings())  # what the pipeline reads: rank, indices


def honest_round(rule, previous, n_clients=3, seed=0):
    starts = [rule.upload_start(previous, RANK, tuple(range(RANK))) for _ in range(n_clients)]
    results = [ClientResult(moved(s, 0.01 * (1 + k / 4), seed + k), n_samples=10 * (k + 1), indices=tuple(range(RANK)))
               for k, s in enumerate(starts)]
    return starts, results


@pytest.mark.parametrize("rule_name", RULES)
def test_honest_round_is_not_clipped_and_aggregates_as_the_papers_formula(spec, rule_name):
    rule = make_rule(rule_name)
    previous = rule.init_global(spec, RANK, seed=3)
    starts, results = honest_round(rule, previous)
    bounded, clipped, anchors = bound_influence(starts, results)
    assert clipped == {} and all(b is r for b, r in zip(bounded, results))
    assert anchors["n_samples"] == 20 and set(anchors) >= {f"{n}.lora_A" for n in spec.modules}
    uploads = [(r.adapter, r.n_samples, list(r.indices)) for r in results]  # the papers' formulas, not the rule code
    assert_matches_reference(rule_name, rule.aggregate(previous, bounded), reference_global(rule_name, previous, uploads))


def test_each_bound_clips_only_the_outliers_change_by_a_scalar(spec):
    rule = make_rule("hetlora")
    previous = rule.init_global(spec, RANK, seed=3)
    starts, results = honest_round(rule, previous)
    name, dense_name = next(iter(spec.modules)), next(iter(spec.dense))
    evil = moved(starts[0], 0.01, seed=9)
    a0, b0 = starts[0].lora[name]
    evil.lora[name] = (a0 + 1e3 * (evil.lora[name][0] - a0), evil.lora[name][1])  # A's change 1000x
    evil.dense[dense_name] = previous.dense[dense_name] + 1e3 * (evil.dense[dense_name] - previous.dense[dense_name])
    results.append(ClientResult(evil, n_samples=10**9, indices=tuple(range(RANK))))
    bounded, clipped, _ = bound_influence(starts + starts[:1], results)
    assert list(clipped) == [3]
    assert {f"{name}.lora_A", dense_name, "n_samples"} <= set(clipped[3]) <= {f"{name}.lora_A", f"{name}.update",
                                                                               f"{name}.lora_B", dense_name, "n_samples"}
    assert all(bounded[k] is results[k] for k in range(3))
    change = bounded[3].adapter.lora[name][0].astype(np.float64) - a0
    honest = sorted(np.linalg.norm(r.adapter.lora[name][0].astype(np.float64) - a0) for r in results)[1]  # lower median
    if f"{name}.update" in clipped[3]:  # the product's change was bounded after the factors'
        assert np.linalg.norm(change) < FACTOR_CLIP * honest
    else:
        assert np.linalg.norm(change) == pytest.approx(FACTOR_CLIP * honest, rel=1e-4)
    raw = evil.lora[name][0].astype(np.float64) - a0
    np.testing.assert_allclose(change / np.linalg.norm(change), raw / np.linalg.norm(raw), rtol=1e-3, atol=1e-6)
    dense_change = bounded[3].adapter.dense[dense_name].astype(np.float64) - previous.dense[dense_name]
    honest_dense = sorted(np.linalg.norm(r.adapter.dense[dense_name] - previous.dense[dense_name]) for r in results)[1]
    assert np.linalg.norm(dense_change) == pytest.approx(CLIP_FACTOR * honest_dense, rel=1e-4)
    assert bounded[3].n_samples == int(CLIP_FACTOR * 20)  # n = 10, 20, 30, 1e9 -> lower median 20


def test_the_reference_has_a_floor_and_a_ceiling_at_the_first_rounds_anchor(spec):
    rule = make_rule("fedavg")
    previous = rule.init_global(spec, RANK, seed=3)
    starts, results = honest_round(rule, previous, n_clients=2)
    _, _, anchors = bound_influence(starts, results)
    dense_name = next(iter(spec.dense))
    anchor = anchors[dense_name]
    tiny = ClientResult(changed(starts[0], moved(starts[0], 0.01, seed=7), 1e-12), n_samples=10)
    honest = ClientResult(moved(starts[0], 0.01, seed=8), n_samples=10)
    bounded, clipped, after = bound_influence(starts, [tiny, honest], anchors)
    assert clipped == {} and bounded[1] is honest and after == anchors  # the floor a / 2 keeps the honest update
    sybils = [ClientResult(changed(starts[0], moved(starts[0], 0.01, seed=20 + k), 100.0), n_samples=10)
              for k in range(3)]
    bounded, clipped, _ = bound_influence(starts[:1] * 4, [honest] + sybils, anchors)
    assert sorted(clipped) == [1, 2, 3]  # a majority cannot raise the reference above CEILING_RATIO x the anchor
    d0 = starts[0].dense[dense_name].astype(np.float64)
    for res in bounded[1:]:
        change = np.linalg.norm(res.adapter.dense[dense_name] - d0)
        assert change == pytest.approx(CLIP_FACTOR * CEILING_RATIO * anchor, rel=1e-4)
    assert CLIP_FACTOR / FLOOR_RATIO > 1.6  # under the floor, the bound is above the honest spread (docstring)


@pytest.mark.parametrize("stage", ["lora", "head-fit"])
def test_a_tiny_update_in_a_two_client_round_does_not_shrink_the_honest_one(spec, stage):
    """Issue 26: a x1e-12 change (1e-6 for a head) as the lower median used to clip the honest client to ~0."""
    rule = make_rule("fedavg")
    config = make_config(spec, aggregator="fedavg", ranks=(RANK,), global_rank=RANK)
    previous = rule.init_global(spec, RANK, seed=3)
    plans = [PLAN] * 2
    start = previous if stage == "lora" else Adapter(lora={}, dense=previous.dense)
    honest = [ClientResult(moved(start, 0.01, seed=k), n_samples=10) for k in range(2)]
    _, _, anchors, _ = aggregate_round(rule, config, stage, previous, honest, plans, {})
    for round_number in range(5):
        update = moved(start, 0.01, seed=100 + round_number)
        tiny = changed(start, moved(start, 0.01, seed=200 + round_number), 1e-12 if stage == "lora" else 1e-6)
        results = [ClientResult(tiny, n_samples=10), ClientResult(update, n_samples=10)]
        new, statistics, anchors, _ = aggregate_round(rule, config, stage, previous, results, plans, anchors)
        assert statistics["clipped"] == {}
        for name, value in new.dense.items():  # the mean of the two changes: the honest one arrives whole
            expected = (update.dense[name].astype(np.float64) + tiny.dense[name]) / 2
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def _factor_bound(start, honest):
    """Per module, the largest ||B A||_F the new global may have: every client's change is within c x the lower
    median, so within c x the largest honest change, and ||A_k|| <= ||A0|| + c max_h ||A_h - A0|| (B alike).
    fedavg, hetlora and plora combine factors convexly (hetlora with zero padding), hlora combines the
    products B_k A_k, so the new global's ||B A|| <= max ||B_k|| max ||A_k||."""
    bounds = {}
    for name, (a0, b0) in start.lora.items():
        a0, b0 = a0.astype(np.float64), b0.astype(np.float64)
        da = max(np.linalg.norm(u.lora[name][0] - a0) for u in honest)
        db = max(np.linalg.norm(u.lora[name][1] - b0) for u in honest)
        bounds[name] = (np.linalg.norm(a0) + FACTOR_CLIP * da) * (np.linalg.norm(b0) + FACTOR_CLIP * db)
    return bounds


def at_limit(poison, start):
    """Every value at the limit, B of the opposite sign, a huge sample count."""
    for name, (a, b) in poison.lora.items():
        poison.lora[name] = (np.full_like(a, MAX_ABS_VALUE), np.full_like(b, -MAX_ABS_VALUE))
    poison.dense = {k: np.full_like(v, MAX_ABS_VALUE) for k, v in poison.dense.items()}
    return 2**31 - 1


def unbalanced(poison, start):
    """B at the limit, A tiny: an ordinary B A, but factors that a factor average multiplies with the others' A."""
    for name, (a, b) in poison.lora.items():
        poison.lora[name] = (a * 1e-4, np.sign(b) * MAX_ABS_VALUE)
    return 10


def scaled_flip(poison, start):
    """Its own change reversed and scaled up 1000x (values stay under the limit)."""
    flipped = changed(start, poison, -1000.0)
    poison.lora, poison.dense = flipped.lora, flipped.dense
    return 10


def sample_count(poison, start):
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


def _download(http, client, number) -> Adapter:
    reply = http.get(f"/v1/rounds/{number}/adapter", headers=client["auth"])
    assert reply.status_code == 200, reply.text
    return decode(reply.content)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("rule_name", RULES)
def test_one_poisoner_cannot_move_the_global_beyond_the_bound(spec, tmp_path, rule_name, attack):
    state = tmp_path / "state"
    config = make_config(spec, aggregator=rule_name, ranks=(RANK,), global_rank=RANK, min_clients=4, rounds=2)
    with running_server(config, state) as http:
        clients = [register(http, RANK) for _ in range(4)]
        indices = list(range(RANK)) if rule_name == "plora" else None
        metas = [upload_meta(c, 1, RANK, 10 * (k + 1), indices=indices) for k, c in enumerate(clients)]
        starts = [_download(http, c, 1) for c in clients]
        honest = [moved(s, 0.01, seed=k, meta=meta) for k, (s, meta) in enumerate(zip(starts[:3], metas))]
        poison = moved(starts[3], 0.01, seed=5)
        poison.meta = {**metas[3], "n_samples": ATTACKS[attack](poison, starts[3])}
        for client, update in zip(clients, honest + [poison]):
            assert post_update(http, client, 1, encode(update)).status_code == 201
        status = http.get("/v1/status")
        assert status.status_code == 200
        statistics = status.json()["history"][0]["statistics"]
        assert list(statistics["clipped"]) == [clients[3]["client_id"]]
        assert statistics["sample_weights"][3] <= CLIP_FACTOR / (CLIP_FACTOR + 3)  # n_4 <= c x lower median
        new = global_adapter(http)
        for name, bound in _factor_bound(starts[0], honest).items():
            a, b = new.lora[name]
            assert np.isfinite(a).all() and np.isfinite(b).all()
            assert update_norm(a, b) <= bound * (1 + 1e-4), name
        previous = decode(http.get("/v1/global", params={"version": 0}).content)
        for name, value in new.dense.items():  # a convex combination of changes, each within c x the median
            assert np.isfinite(value).all()
            honest_change = sorted(np.linalg.norm(u.dense[name] - previous.dense[name]) for u in honest)
            assert np.linalg.norm(value - previous.dense[name]) <= CLIP_FACTOR * honest_change[1] * (1 + 1e-4), name


def _federate(http, clients, targets, scales, rounds) -> list[Adapter]:
    """`rounds` fedavg rounds in which client k "trains" from its download towards targets[k] (a tenth of the
    way, as a local optimiser would) and uploads start + scales[k] x that change; the globals, version by version."""
    globals_ = []
    for number in range(1, rounds + 1):
        for client, target, scale in zip(clients, targets, scales):
            start = _download(http, client, number)
            trained = changed(start, target, 0.1)
            update = changed(start, trained, scale)
            update.meta = upload_meta(client, number, RANK, 10)
            reply = post_update(http, client, number, encode(update))
            assert reply.status_code == 201, reply.text
        globals_.append(global_adapter(http))
    return globals_


def _norm(adapter: Adapter) -> float:
    return float(np.sqrt(sum(np.sum(t.astype(np.float64) ** 2) for pair in adapter.lora.values() for t in pair)
                         + sum(np.sum(t.astype(np.float64) ** 2) for t in adapter.dense.values())))


@pytest.mark.slow
def test_a_x100_attacker_cannot_walk_the_bound_over_ten_rounds(spec, tmp_path):
    """Issue 26: one model-replacement attacker of two (x100) grew fedavg's global 4-9x per round (max |x| from
    0.18 to 5,498 by round 6). Now the global stays within 2x of the clean run's, by norm and by max |x|."""
    rule = make_rule("fedavg")
    base = rule.init_global(spec, RANK, seed=1)
    targets = [moved(base, 0.05, seed=50 + k) for k in range(2)]
    runs = {}
    for label, scales in (("clean", (1.0, 1.0)), ("attacked", (1.0, 100.0))):
        config = make_config(spec, aggregator="fedavg", ranks=(RANK,), global_rank=RANK, min_clients=2, rounds=10)
        with running_server(config, tmp_path / label) as http:
            clients = [register(http, RANK, name=f"dev-{k}") for k in range(2)]
            runs[label] = _federate(http, clients, targets, scales, rounds=10)
            history = http.get("/v1/status").json()["history"]
            if label == "attacked":
                assert all(list(h["statistics"]["clipped"]) == [clients[1]["client_id"]] for h in history)
    for clean, attacked in zip(runs["clean"], runs["attacked"]):
        assert _norm(attacked) <= 2 * _norm(clean)
        peak = lambda g: max(float(np.abs(t).max()) for t in [*g.dense.values(), *(x for p in g.lora.values() for x in p)])  # noqa: E731
        assert peak(attacked) <= 2 * peak(clean)


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
