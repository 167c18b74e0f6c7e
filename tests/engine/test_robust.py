"""`--robust` (hetlora/engine/aggregation/robust.py) against independent references: np.median (Flower's FedMedian),
scipy.stats.trim_mean (Flower's FedTrimmedAvg), a per-component loop for mixed ranks; norm-bound against a
majority of attackers; the HTTP server and the Flower run config take the same option."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import trim_mean

from hetlora.engine.aggregation import ClientResult, make_rule
from hetlora.engine.aggregation.pipeline import aggregate_round
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.settings import TrainingSettings
from hetlora.engine.aggregation.robust import NORM_BOUND_FACTOR, Defence
from tests.helpers.adapters import changed, moved
from tests.helpers.server import make_config

RANK = 8
PLAN = ClientPlan(round=1, rank=RANK, mode="plain", training=TrainingSettings())


def fedavg_round(spec, robust, n_clients=7, seed=0):
    rule = make_rule("fedavg")
    config = make_config(spec, aggregator="fedavg", ranks=(RANK,), global_rank=RANK, defence=Defence(robust=robust))
    previous = rule.init_global(spec, RANK, seed=3)
    uploads = [moved(previous, 0.01, seed=seed + k) for k in range(n_clients)]
    results = [ClientResult(u, n_samples=10 + k) for k, u in enumerate(uploads)]
    new, statistics, _, _ = aggregate_round(rule, config, "lora", previous, results, [PLAN]
                                            * n_clients, {})
    return uploads, new, statistics


@pytest.mark.parametrize("robust, reference", [
    ("median", lambda stack: np.median(stack, axis=0)),
    ("trimmed-mean", lambda stack: trim_mean(stack, 0.2, axis=0)),
])
def test_fedavg_with_a_robust_option_is_the_coordinatewise_statistic_of_the_clients(spec, robust, reference):
    uploads, new, statistics = fedavg_round(spec, robust)
    assert statistics["clipped"] == {} and statistics["robust"] == robust
    for name in spec.modules:
        for side in (0, 1):
            expected = reference(np.stack([u.lora[name][side].astype(np.float64) for u in uploads]))
            np.testing.assert_allclose(new.lora[name][side], expected, rtol=1e-5, atol=1e-6)
    for name in spec.dense:
        expected = reference(np.stack([u.dense[name].astype(np.float64) for u in uploads]))
        np.testing.assert_allclose(new.dense[name], expected, rtol=1e-5, atol=1e-6)


def test_mixed_ranks_take_the_median_over_the_clients_covering_each_component(spec):
    rule = make_rule("hetlora", segment_average=True)
    previous = rule.init_global(spec, RANK, seed=3)
    ranks = (2, 4, 8, 8, 4)
    starts = [rule.upload_start(previous, r, None) for r in ranks]
    results = [ClientResult(moved(s, 0.01, seed=k), n_samples=10) for k, s in enumerate(starts)]
    index_sets = [tuple(range(r)) for r in ranks]
    out, clipped, _ = Defence(robust="median").apply(starts, results, index_sets, {})
    assert clipped == {}
    name = next(iter(spec.modules))
    a_prev = previous.lora[name][0].astype(np.float64)
    for j in range(RANK):  # reference: a loop over the components and the clients that have them
        covering = [k for k, r in enumerate(ranks) if j < r]
        median = np.median([results[k].adapter.lora[name][0][j] - a_prev[j] for k in covering], axis=0)
        for k in covering:
            np.testing.assert_allclose(out[k].adapter.lora[name][0][j], a_prev[j] + median, rtol=1e-5, atol=1e-6)
    for k, r in enumerate(ranks):
        assert out[k].adapter.lora[name][0].shape[0] == r  # every client keeps its own rank


def test_norm_bound_holds_the_first_rounds_bound_against_a_majority(spec):
    rule = make_rule("fedavg")
    config = make_config(spec, aggregator="fedavg", ranks=(RANK,), global_rank=RANK,
                         defence=Defence(robust="norm-bound"))
    previous = rule.init_global(spec, RANK, seed=3)
    plans = [PLAN] * 4
    honest = [ClientResult(moved(previous, 0.01, seed=k), n_samples=10) for k in range(4)]
    _, _, anchors, _ = aggregate_round(rule, config, "lora", previous, honest, plans, {})
    dense = next(iter(spec.dense))
    anchor = anchors["lora"][dense]
    attackers = [ClientResult(changed(previous, moved(previous, 0.01, seed=10 + k), 50.0), n_samples=10)
                 for k in range(3)]
    new, statistics, _, _ = aggregate_round(rule, config, "lora", previous, honest[:1] + attackers, plans, anchors)
    assert sorted(statistics["clipped"]) == [1, 2, 3]
    change = np.linalg.norm(new.dense[dense].astype(np.float64) - previous.dense[dense])
    assert change <= NORM_BOUND_FACTOR * anchor * (1 + 1e-5)  # a convex combination of bounded changes
    relative = make_config(spec, aggregator="fedavg", ranks=(RANK,), global_rank=RANK)
    loose, _, _, _ = aggregate_round(rule, relative, "lora", previous, honest[:1] + attackers, plans, anchors)
    assert np.linalg.norm(loose.dense[dense].astype(np.float64) - previous.dense[dense]) > 2 * change


def test_the_robust_option_reaches_http_and_flower_through_the_same_flags(spec):
    from hetlora_flower.settings import server_config

    config = server_config({"robust": "trimmed-mean", "trim-beta": 0.3, "num-server-rounds": 1})
    assert config.defence == Defence(robust="trimmed-mean", trim_beta=0.3)
    assert config.run_config()["robust"] == "trimmed-mean"
    from hetlora.errors import UserError

    with pytest.raises(UserError, match="trim-beta"):
        server_config({"robust": "trimmed-mean", "trim-beta": 0.5})
