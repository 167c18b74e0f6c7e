"""Round 0: per-class feature statistics (client), their checks, the closed-form head (server), over HTTP.

The LDA head is checked against scikit-learn's LinearDiscriminantAnalysis fitted on the raw
features (an independent implementation of the same estimator), the statistics against
features computed directly from the model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetlora.protocol.head_stats import class_statistics, decode_statistics, encode_statistics
from hetlora.protocol.wire import WireFormatError
from hetlora.engine.aggregation.head_init import class_head, pool
from tests.helpers.heads import C, D, raw_features, statistics_of



def test_statistics_round_trip_exactly():
    stats = statistics_of(*raw_features(0))
    back = decode_statistics(encode_statistics(stats), num_labels=C, dim=D, max_feature_norm=None)
    for name in ("class_sums", "class_counts", "feature_gram"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    assert back.meta == stats.meta and back.n_samples == 40


@pytest.mark.parametrize("damage,code", [
    (lambda s: s.class_sums.__setitem__((0, 0), np.nan), "not_finite"),
    (lambda s: s.class_counts.__setitem__(0, s.class_counts[0] + 1), "bad_statistics"),
    (lambda s: s.class_counts.__setitem__(0, 0.5), "bad_statistics"),
    (lambda s: s.feature_gram.__setitem__((0, 1), s.feature_gram[0, 1] + 100), "bad_statistics"),
    (lambda s: s.class_sums.__imul__(1e3), "bad_statistics"),  # class means longer than the features
])
def test_damaged_statistics_are_refused(damage, code):
    stats = statistics_of(*raw_features(1))
    damage(stats)
    with pytest.raises(WireFormatError) as err:
        decode_statistics(encode_statistics(stats), num_labels=C, dim=D, max_feature_norm=None)
    assert err.value.code == code


def test_statistics_of_the_wrong_shape_or_too_long_features_are_refused():
    features, labels = raw_features(2)
    stats = statistics_of(features, labels)
    with pytest.raises(WireFormatError, match="shape"):
        decode_statistics(encode_statistics(stats), num_labels=C + 1, dim=D, max_feature_norm=None)
    # Features of norm > 1 under a pooling that L2-normalises them.
    with pytest.raises(WireFormatError, match="longer than the pooling allows"):
        decode_statistics(encode_statistics(stats), num_labels=C, dim=D, max_feature_norm=1.0)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    decode_statistics(encode_statistics(statistics_of(unit, labels)), num_labels=C, dim=D, max_feature_norm=1.0)


def test_lda_head_matches_scikit_learn_on_the_pooled_data():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    parts = [raw_features(seed) for seed in (3, 4, 5)]
    pooled = pool([statistics_of(f, y) for f, y in parts])
    features = np.vstack([f for f, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    weight, bias = class_head(pooled, "lda", shrinkage=0.2, temperature=0.5)
    reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.2).fit(features, labels)
    np.testing.assert_allclose(weight, 0.5 * reference.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias, 0.5 * reference.intercept_, rtol=1e-4, atol=1e-5)


def test_ncm_head_is_the_normalised_class_means_and_absent_classes_never_win():
    features, labels = raw_features(6, num_labels=3)
    stats = statistics_of(features, labels, num_labels=C)  # class 3 has no examples
    weight, bias = class_head(stats, "ncm", shrinkage=0.0, temperature=2.0)
    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(weight[:3], 2.0 * means / np.linalg.norm(means, axis=1, keepdims=True), rtol=1e-5)
    assert not weight[3].any() and bias[3] == bias[:3].min()


def test_trainer_statistics_are_those_of_the_frozen_models_features(tiny_bert_dir):
    from edge_client.data import Examples, encode
    from hetlora.models.task_model import load_task_model, load_tokenizer
    from edge_client.training import TorchTrainer

    texts = ("how do I activate my card", "exchange rate for euros please", "card declined", "send money abroad",
             "what is my balance")
    examples = Examples("classification", texts, (0, 1, 0, 2, 1))
    trainer = TorchTrainer(tiny_bert_dir, "classification", labels=["a", "b", "c"])
    stats = class_statistics(*trainer.frozen_features(examples, 16), 3)
    model = load_task_model(tiny_bert_dir, "classification", 3).eval()  # native pooling: BERT's pooler
    enc = encode(examples, load_tokenizer(tiny_bert_dir), 16)
    with torch.no_grad():
        features = model.bert(input_ids=torch.from_numpy(enc.input_ids),
                              attention_mask=torch.from_numpy(enc.attention_mask)).pooler_output.double().numpy()
    expected = statistics_of(features, np.array(examples.label_ids), num_labels=3)
    np.testing.assert_allclose(stats.class_sums, expected.class_sums, atol=1e-5)
    np.testing.assert_array_equal(stats.class_counts, [2, 2, 1])
    np.testing.assert_allclose(stats.feature_gram, expected.feature_gram, atol=1e-5)


def test_round_zero_over_http_sets_the_head_of_global_zero_then_lora_rounds_open(spec, tmp_path):
    from hetlora.protocol.wire import decode
    from hetlora.engine.aggregation import make_rule
    from tests.helpers.server import make_config, register, running_server

    config = make_config(spec, head_init="lda", min_clients=2, start_clients=3)
    num_labels, dim = spec.dense["classifier.weight"]
    with running_server(config, tmp_path / "state") as http:
        clients = [register(http, 8, n_samples=12, name=f"dev-{k}") for k in range(2)]
        assert http.get("/v1/round", headers=clients[0]["auth"]).json()["state"] == "waiting"
        clients.append(register(http, 8, n_samples=12, name="dev-2"))
        current = http.get("/v1/round", headers=clients[0]["auth"]).json()
        assert (current["round"], current["stage"], current["selected"]) == (0, "head-statistics", True)
        assert http.get("/v1/rounds/0/adapter", headers=clients[0]["auth"]).json()["error"]["code"] == "head_round"
        assert http.get("/v1/global").status_code == 404

        uploads = []
        for k, client in enumerate(clients):
            features, labels = raw_features(10 + k, n=12, num_labels=num_labels, dim=dim)
            stats = statistics_of(features, labels, num_labels, {"round": 0, "client_id": client["client_id"],
                                                                 "n_samples": 12})
            if k == 0:  # a NaN upload is refused and leaves nothing behind
                bad = statistics_of(features, labels, num_labels, stats.meta)
                bad.feature_gram[0, 0] = np.nan
                reply = http.post("/v1/rounds/0/update", content=encode_statistics(bad), headers=client["auth"])
                assert reply.status_code == 400 and reply.json()["error"]["code"] == "not_finite"
                assert not list((tmp_path / "state").rglob("uploads/r0000/*"))
            reply = http.post("/v1/rounds/0/update", content=encode_statistics(stats), headers=client["auth"])
            assert reply.status_code == 201, reply.text
            uploads.append(stats)

        global0 = decode(http.get("/v1/global", params={"version": 0}).content)
        weight, bias = class_head(pool(uploads), "lda", shrinkage=config.head_shrinkage,
                                  temperature=config.head_temperature)
        np.testing.assert_array_equal(global0.dense["classifier.weight"], weight)
        np.testing.assert_array_equal(global0.dense["classifier.bias"], bias)
        start = make_rule("hetlora").init_global(spec, config.global_rank, config.seed)
        for name, (a, b) in start.lora.items():
            np.testing.assert_array_equal(global0.lora[name][0], a)
            np.testing.assert_array_equal(global0.lora[name][1], b)
        status = http.get("/v1/status").json()
        assert status["history"][0]["round"] == 0 and status["history"][0]["statistics"]["total_samples"] == 36
        assert status["round"]["number"] == 1 and status["round"]["state"] == "open"


def test_an_ill_conditioned_lda_head_falls_back_to_class_means():
    """Features with almost no spread inside a class (a random-weight model's pooler) make the lda
    weights explode; the server then uses the ncm head, whose weights are bounded by the temperature."""
    from hetlora.engine.aggregation.head_init import safe_class_head

    rng = np.random.default_rng(8)
    labels = rng.integers(0, C, 60)
    features = rng.normal(0, 1, (C, D))[labels] + rng.normal(0, 1e-7, (60, D))
    stats = statistics_of(features, labels)
    weight, bias, used = safe_class_head(stats, "lda", shrinkage=0.01, temperature=0.1)
    assert used == "ncm" and np.abs(weight).max() <= 0.1 + 1e-6 and not bias.any()
    well = statistics_of(*raw_features(9))
    assert safe_class_head(well, "lda", shrinkage=0.01, temperature=0.1)[2] == "lda"
