"""Server optimisers on the aggregated update, against dense references written from the formulas."""

from __future__ import annotations

import numpy as np
import pytest

from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation.server_opt import ServerOptimizer


def adapter(seed, rank=3, shape=(5, 4)):
    rng = np.random.default_rng(seed)
    out_f, in_f = shape
    return Adapter(lora={"m": (rng.normal(size=(rank, in_f)).astype(np.float32),
                               rng.normal(size=(out_f, rank)).astype(np.float32))},
                   dense={"head": rng.normal(size=(2, in_f)).astype(np.float32)})


def flat(a: Adapter) -> dict:
    return {"A": a.lora["m"][0].astype(np.float64), "B": a.lora["m"][1].astype(np.float64),
            "head": a.dense["head"].astype(np.float64)}


@pytest.mark.parametrize("name", ["momentum", "adam", "yogi"])
def test_factor_space_optimisers_follow_their_formulas_over_three_rounds(name):
    opt = ServerOptimizer(name, lr=0.5, beta1=0.8, beta2=0.9, tau=0.01)
    x, state = adapter(0), {}
    m = {k: 0.0 for k in ("A", "B", "head")}
    v = dict(m)
    expected = flat(x)
    for t in range(3):
        aggregated = adapter(10 + t)
        x, state = opt.step(x, aggregated, state, product_space=False)
        for k, target in flat(aggregated).items():
            d = target - expected[k]
            if name == "momentum":
                m[k] = 0.8 * m[k] + d
                u = m[k]
            else:
                m[k] = 0.8 * m[k] + 0.2 * d
                v[k] = 0.9 * v[k] + 0.1 * d * d if name == "adam" else v[k] - 0.1 * d * d * np.sign(v[k] - d * d)
                u = m[k] / (np.sqrt(v[k]) + 0.01)
            expected[k] = expected[k] + 0.5 * u
        for k, got in flat(x).items():
            np.testing.assert_allclose(got, expected[k], rtol=1e-4, atol=1e-5)


def test_plain_momentum_with_lr_one_and_no_memory_is_the_rule_itself():
    x, aggregated = adapter(1), adapter(2)
    got, _ = ServerOptimizer("momentum", lr=1.0, beta1=0.0).step(x, aggregated, {}, product_space=False)
    for k, value in flat(got).items():
        np.testing.assert_allclose(value, flat(aggregated)[k], atol=1e-6)


def test_hlora_momentum_acts_on_the_product_and_matches_a_dense_reference():
    """Ranks are large enough here that no truncation happens, so the dense reference is exact:
    M_t = beta M_{t-1} + (B_t A_t - B_{t-1} A_{t-1}), W_t = W_{t-1} + lr M_t."""
    opt = ServerOptimizer("momentum", lr=0.7, beta1=0.5)
    rank = 12  # >= the rank of every sum below, for 5 x 4 matrices
    x, state = adapter(3, rank=rank), {}
    w = x.lora["m"][1].astype(np.float64) @ x.lora["m"][0]
    m = np.zeros_like(w)
    for t in range(3):
        aggregated = adapter(20 + t, rank=rank)
        target = aggregated.lora["m"][1].astype(np.float64) @ aggregated.lora["m"][0]
        m = 0.5 * m + (target - w)
        w = w + 0.7 * m
        x, state = opt.step(x, aggregated, state, product_space=True)
        np.testing.assert_allclose(x.lora["m"][1].astype(np.float64) @ x.lora["m"][0], w, rtol=1e-4, atol=1e-4)


def test_hlora_refuses_adaptive_server_optimisers():
    with pytest.raises(ValueError, match="momentum"):
        ServerOptimizer("adam").check_rule("hlora")


def test_server_runs_the_optimiser_and_its_state_survives_a_restart(spec, tmp_path):
    """Two rounds of hetlora with server momentum, the server restarted between them: global 2 equals the
    optimiser applied by hand to the rule's aggregates (so the round-1 momentum was read back from disk)."""
    from hetlora.protocol.wire import decode, encode
    from hetlora.engine.aggregation import ClientResult, make_rule
    from tests.helpers.server import make_config, make_update, post_update, register, running_server, upload_meta

    opt = ServerOptimizer("momentum", lr=0.8, beta1=0.6)
    config = make_config(spec, aggregator="hetlora", server_opt=opt, min_clients=2, rounds=2)
    rule = make_rule("hetlora")
    expected, state = rule.init_global(spec, config.global_rank, config.seed), {}
    clients = None
    for number in (1, 2):
        with running_server(config, tmp_path / "state") as http:
            clients = clients or [register(http, r, name=f"dev{r}") for r in (2, 8)]
            results = []
            for k, client in enumerate(clients):
                rank = http.get("/v1/round", headers=client["auth"]).json()["rank"]
                update = make_update(spec, rank, upload_meta(client, number, rank, 10 + k), seed=10 * number + k)
                assert post_update(http, client, number, encode(update)).status_code == 201
                results.append(ClientResult(update, 10 + k))
            expected, state = opt.step(expected, rule.aggregate(expected, results), state, product_space=False)
            got = decode(http.get("/v1/global", params={"version": number}).content)
        for name, (a, b) in expected.lora.items():
            np.testing.assert_allclose(got.lora[name][0], a, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.lora[name][1], b, rtol=1e-5, atol=1e-6)
        for name, t in expected.dense.items():
            np.testing.assert_allclose(got.dense[name], t, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "state" / "blobs" / "optimizer" / "v0002.safetensors").is_file()
