"""The head rounds: the client's logit-adjusted head fit (against torch autograd + torch's Adam), the
server's head averaging over real HTTP, and the checks of a head upload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_client.head_fit import adjusted_loss, fit_head, logit_adjustment
from hetlora.protocol.head_stats import encode_statistics
from hetlora.protocol.wire import Adapter, decode, encode
from hetlora.engine.aggregation.bounds import CLIP_FACTOR
from tests.helpers.heads import raw_features, statistics_of
from tests.helpers.server import make_config, register, running_server


def torch_reference_fit(weight, bias, x, y, adjust, *, epochs, lr, batch_size, seed):
    """The same fit written with torch autograd and torch.optim.Adam, drawing the same batches."""
    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    x, y, a = torch.tensor(x), torch.tensor(y), torch.tensor(adjust)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(order), batch_size):
            rows = torch.tensor(order[start:start + batch_size])
            loss = torch.nn.functional.cross_entropy(x[rows] @ w.T + b + a, y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach().numpy(), b.detach().numpy()


def skewed_client(seed, num_labels=5, dim=6, n=30):
    """Features of a client that has examples of classes 0..2 only, mostly of class 0."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    centers = rng.normal(0, 1, (num_labels, dim))
    return centers[labels] + rng.normal(0, 0.5, (n, dim)), labels


def test_the_head_fit_equals_torch_autograd_with_torchs_adam():
    x, y = skewed_client(0)
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(0, 0.1, (5, 6)), rng.normal(0, 0.1, 5)
    pooled = [40, 30, 20, 10, 25]
    adjust = logit_adjustment(y, 5, pooled)
    fit = fit_head(weight, bias, x, y, adjust, epochs=3, lr=0.05, batch_size=8, seed=4)
    want_w, want_b = torch_reference_fit(weight, bias, x, y, adjust, epochs=3, lr=0.05, batch_size=8, seed=4)
    np.testing.assert_allclose(fit.weight, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.bias, want_b, rtol=1e-5, atol=1e-6)
    assert fit.loss_after < fit.loss_before


def test_the_logit_adjustment_is_the_local_over_the_smoothed_pooled_class_share():
    y = np.array([0, 0, 0, 1])
    adjust = logit_adjustment(y, 3, class_counts=[5, 3, 2])
    pooled = np.array([6, 4, 3]) / 13  # Laplace-smoothed
    np.testing.assert_allclose(adjust[:2], np.log([0.75, 0.25]) - np.log(pooled[:2]))
    assert adjust[2] == -np.inf
    np.testing.assert_allclose(logit_adjustment(y, 3)[:2], np.log([0.75, 0.25]) - np.log(1 / 3))  # no counts
    with pytest.raises(ValueError, match="2 entries for 3 labels"):
        logit_adjustment(y, 3, class_counts=[1, 2])


def test_a_client_never_moves_the_head_rows_of_classes_it_has_not_seen():
    x, y = skewed_client(2)
    rng = np.random.default_rng(3)
    weight, bias = rng.normal(0, 0.1, (5, 6)).astype(np.float32), rng.normal(0, 0.1, 5).astype(np.float32)
    fit = fit_head(weight, bias, x, y, logit_adjustment(y, 5, [10] * 5), epochs=4, lr=0.05, batch_size=8, seed=0)
    np.testing.assert_array_equal(fit.weight[3:], weight[3:])
    np.testing.assert_array_equal(fit.bias[3:], bias[3:])
    assert not np.allclose(fit.weight[:3], weight[:3])


def test_bad_fit_arguments_are_value_errors():
    x, y = skewed_client(4)
    with pytest.raises(ValueError, match="epochs >= 1"):
        fit_head(np.zeros((5, 6)), np.zeros(5), x, y, np.zeros(5), epochs=0, lr=0.1, batch_size=4, seed=0)
    assert np.isfinite(adjusted_loss(np.zeros((5, 6)), np.zeros(5), x, y, logit_adjustment(y, 5)))


def head_upload(client, number, weight, bias, **meta):
    doc = {"round": number, "client_id": client["client_id"], "mode": "head-fit", "n_samples": 12} | meta
    return encode(Adapter(lora={}, dense={"classifier.weight": weight, "classifier.bias": bias}, meta=doc))


def test_head_rounds_over_http_average_the_heads_and_keep_the_factors(spec, tmp_path):
    config = make_config(spec, head_init="lda", min_clients=2, start_clients=3, head_rounds=2, clients_per_round=2)
    num_labels, dim = spec.dense["classifier.weight"]
    with running_server(config, tmp_path / "state") as http:
        clients = [register(http, 8, n_samples=12, name=f"dev-{k}") for k in range(3)]
        pooled = np.zeros(num_labels)
        for k, client in enumerate(clients):
            features, labels = raw_features(20 + k, n=12, num_labels=num_labels, dim=dim)
            stats = statistics_of(features / np.linalg.norm(features, axis=1, keepdims=True), labels, num_labels,
                                  {"round": 0, "client_id": client["client_id"], "n_samples": 12})
            pooled += stats.class_counts
            assert http.post("/v1/rounds/0/update", content=encode_statistics(stats), headers=client["auth"]).status_code == 201
        global0 = decode(http.get("/v1/global", params={"version": 0}).content)

        current = http.get("/v1/round", headers=clients[0]["auth"]).json()
        assert (current["round"], current["stage"], current["plan"]["mode"]) == (1, "head-fit", "head-fit")
        assert current["plan"]["class_counts"] == [int(c) for c in pooled]
        assert http.get("/v1/status").json()["round"]["selected"] == [c["client_id"] for c in clients]  # everyone
        download = decode(http.get("/v1/rounds/1/adapter", headers=clients[0]["auth"]).content)
        assert not download.lora and set(download.dense) == set(global0.dense)

        w0, b0 = global0.dense["classifier.weight"], global0.dense["classifier.bias"]
        refused = {
            "unexpected_lora": encode(Adapter(lora=global0.lora, dense=global0.dense,
                                              meta={"round": 1, "client_id": clients[0]["client_id"], "mode": "head-fit",
                                                    "n_samples": 12})),
            "bad_metadata": head_upload(clients[0], 1, w0, b0, mode="hetlora"),
            "not_finite": head_upload(clients[0], 1, np.full_like(w0, np.nan), b0),
            "bad_shape": head_upload(clients[0], 1, w0[:, :-1], b0),
        }
        for code, body in refused.items():
            reply = http.post("/v1/rounds/1/update", content=body, headers=clients[0]["auth"])
            assert reply.status_code == 400 and reply.json()["error"]["code"] == code, reply.text
        assert not list((tmp_path / "state").rglob("uploads/r0001/*"))

        rng = np.random.default_rng(5)
        heads = [(w0 + rng.normal(0, 0.01, w0.shape).astype(np.float32), b0 + np.float32(0.01 * k)) for k in range(3)]
        n_samples = [12, 24, 36]
        for client, (w, b), n in zip(clients, heads, n_samples):
            reply = http.post("/v1/rounds/1/update", content=head_upload(client, 1, w, b, n_samples=n),
                              headers=client["auth"])
            assert reply.status_code == 201, reply.text
        global1 = decode(http.get("/v1/global", params={"version": 1}).content)
        np.testing.assert_allclose(global1.dense["classifier.weight"],
                                   np.average([w for w, _ in heads], axis=0, weights=n_samples), rtol=1e-6)
        np.testing.assert_allclose(global1.dense["classifier.bias"],
                                   np.average([b for _, b in heads], axis=0, weights=n_samples), rtol=1e-6)
        for name, (a, b) in global0.lora.items():
            np.testing.assert_array_equal(global1.lora[name][0], a)
            np.testing.assert_array_equal(global1.lora[name][1], b)
        status = http.get("/v1/status").json()
        assert [h["stage"] for h in status["history"]] == ["head-statistics", "head-fit"]
        assert status["history"][1]["statistics"]["head_change"] > 0 and status["rounds"] == config.last_round
        assert http.get("/v1/round", headers=clients[0]["auth"]).json()["stage"] == "head-fit"  # round 2


def test_head_rounds_need_a_head_initialisation(spec):
    from hetlora.errors import UserError

    with pytest.raises(UserError, match="--head-rounds needs --head-init"):
        make_config(spec, head_init="none", head_rounds=3)


def clipped_head(heads: list, start: dict) -> list:
    """Bounded influence of head uploads, written out: per tensor, a change from `start` larger than CLIP_FACTOR x
    the round's lower median change is scaled down to that bound (docs/PROTOCOL.md section 3.1)."""
    out = [dict(h) for h in heads]
    for tensor, origin in start.items():
        changes = [h[tensor].astype(np.float64) - origin for h in heads]
        bound = CLIP_FACTOR * sorted(np.linalg.norm(c) for c in changes)[(len(changes) - 1) // 2]
        for k, change in enumerate(changes):
            out[k][tensor] = origin + min(1.0, bound / np.linalg.norm(change)) * change
    return out


def test_a_head_round_clips_a_head_that_moved_too_far(spec, tmp_path):
    """Three heads; the third moved 1000x as far as the others: it is reported clipped and the global is the
    sample-weighted average of the heads after the bound."""
    config = make_config(spec, head_init="ncm", min_clients=3, start_clients=3, head_rounds=1)
    num_labels, dim = spec.dense["classifier.weight"]
    with running_server(config, tmp_path / "state") as http:
        clients = [register(http, 8, n_samples=12, name=f"dev-{k}") for k in range(3)]
        for k, client in enumerate(clients):
            features, labels = raw_features(40 + k, n=12, num_labels=num_labels, dim=dim)
            stats = statistics_of(features / np.linalg.norm(features, axis=1, keepdims=True), labels, num_labels,
                                  {"round": 0, "client_id": client["client_id"], "n_samples": 12})
            assert http.post("/v1/rounds/0/update", content=encode_statistics(stats),
                             headers=client["auth"]).status_code == 201
        global0 = decode(http.get("/v1/global", params={"version": 0}).content)
        start = {name: global0.dense[name].astype(np.float64) for name in ("classifier.weight", "classifier.bias")}
        rng = np.random.default_rng(9)
        heads = [{name: (value + scale * rng.normal(0, 0.01, value.shape)).astype(np.float32)
                  for name, value in start.items()} for scale in (1.0, 1.5, 1000.0)]
        n_samples = [12, 24, 36]
        for client, head, n in zip(clients, heads, n_samples):
            reply = http.post("/v1/rounds/1/update", headers=client["auth"], content=head_upload(
                client, 1, head["classifier.weight"], head["classifier.bias"], n_samples=n))
            assert reply.status_code == 201, reply.text
        global1 = decode(http.get("/v1/global", params={"version": 1}).content)
        entry = http.get("/v1/status").json()["history"][1]
    assert entry["stage"] == "head-fit"
    assert set(entry["statistics"]["clipped"]) == {clients[2]["client_id"]}
    assert {"classifier.weight", "classifier.bias"} <= set(entry["statistics"]["clipped"][clients[2]["client_id"]])
    for name, value in start.items():
        expected = np.average([h[name] for h in clipped_head(heads, start)], axis=0, weights=n_samples)
        np.testing.assert_allclose(global1.dense[name], expected, rtol=1e-5, atol=1e-7)
