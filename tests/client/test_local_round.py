"""The one device round (edge_client.local_round) that `hetlora client` and the Flower ClientApp share, and the
Flower process's node cache (data loaded once per node, one trainer per run).

References: a LoRA round against the trainer's own `train_round` on the same start (the wire bytes must carry
the same tensors), round 0's statistics against numpy sums of the frozen features, a head fit against
`fit_plan_head` on the same features.
"""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest

from edge_client.data import load_examples
from edge_client.local_round import LocalModel, LocalRound, PlanMismatch
from hetlora.models.adapter_spec import derive_spec
from hetlora.errors import UserError
from hetlora.protocol.energy import Power
from hetlora.protocol.head_stats import decode_statistics
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.spec import linear_head
from hetlora.protocol.wire import Adapter, decode, encode

LABELS = ["alpha", "beta", "gamma"]
TARGETS = ("query", "value")
SETTINGS = TrainingSettings(steps=2, batch_size=4, seq_len=16, lr=1e-2, seed=3)
POWER = Power(watts=5.0, source="test")


@pytest.fixture(scope="module")
def run(tiny_bert_dir) -> dict:
    from hetlora.engine.config import ServerConfig

    spec = derive_spec(tiny_bert_dir, "classification", TARGETS, len(LABELS))
    return ServerConfig(spec=spec, aggregator="hetlora", labels=LABELS, ranks=(2, 4), global_rank=4,
                        min_clients=1, rounds=1).run_config()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("local-round") / "rows.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(12):
            writer.writerow([f"message number {i} about {LABELS[i % 3]}", LABELS[i % 3]])
    return path


@pytest.fixture(scope="module")
def local(run, data_file, tiny_bert_dir) -> LocalModel:
    return LocalModel(run, load_examples(data_file, "classification", LABELS), tiny_bert_dir)


def start_adapter(local: LocalModel, rank: int, seed: int = 0, lora: bool = True) -> Adapter:
    rng = np.random.default_rng(seed)
    factors = {name: (rng.normal(0, 0.05, (rank, m.in_features)).astype(np.float32),
                      rng.normal(0, 0.05, (m.out_features, rank)).astype(np.float32))
               for name, m in local.spec.modules.items()} if lora else {}
    dense = {name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in local.spec.dense.items()}
    return Adapter(lora=factors, dense=dense, meta={})


def test_lora_round_is_the_trainers_round_with_the_protocols_metadata(local):
    plan = ClientPlan(round=2, rank=2, mode="plain", training=SETTINGS)
    start = start_adapter(local, 4)
    output = LocalRound(local, plan, SETTINGS, "c-1", POWER).run(local.start(encode(start), plan))
    sent = decode(output.body)
    want = local.trainer.train_round(start, local.examples, SETTINGS, rank=2, mode="plain")
    for name, (a, b) in want.adapter.lora.items():
        np.testing.assert_allclose(sent.lora[name][0], a, atol=1e-6)
        np.testing.assert_allclose(sent.lora[name][1], b, atol=1e-6)
    assert sent.meta["round"] == 2 and sent.meta["client_id"] == "c-1" and sent.meta["rank"] == 2
    assert sent.meta["n_samples"] == 12 and sent.meta["energy"]["watts"] == 5.0
    assert output.report["steps"] == 2 and output.report["rank_after"] == 2
    assert "rank 2, loss" in output.summary


def test_round_zero_statistics_are_the_sums_of_the_frozen_features(local):
    plan = ClientPlan(round=0, rank=2, mode="head-statistics", training=SETTINGS)
    features, labels = local.trainer.frozen_features(local.examples, SETTINGS.seq_len)
    body = LocalRound(local, plan, SETTINGS, "c-1", POWER).run().body
    stats = decode_statistics(body, num_labels=len(LABELS), dim=features.shape[1])
    np.testing.assert_array_equal(stats.class_counts, np.bincount(labels, minlength=len(LABELS)))
    for c in range(len(LABELS)):
        np.testing.assert_allclose(stats.class_sums[c], features[labels == c].sum(axis=0), rtol=1e-5, atol=1e-6)
    assert stats.meta["client_id"] == "c-1" and stats.meta["n_samples"] == 12


def test_head_fit_fits_the_downloaded_head_on_the_cached_features(local):
    from edge_client.head_fit import fit_plan_head

    plan = ClientPlan(round=1, rank=2, mode="head-fit", training=SETTINGS, class_counts=(4, 4, 4))
    start = local.start(encode(start_adapter(local, 4, lora=False)), plan)
    sent = decode(LocalRound(local, plan, SETTINGS, "c-1", POWER).run(start).body)
    features, labels = local.trainer.frozen_features(local.examples, SETTINGS.seq_len)
    want, _ = fit_plan_head(local.spec, start, features, labels, plan, SETTINGS, "c-1", POWER)
    weight, bias, _, _ = linear_head(local.spec)
    assert not sent.lora
    np.testing.assert_allclose(sent.dense[weight], want.dense[weight], atol=1e-6)
    np.testing.assert_allclose(sent.dense[bias], want.dense[bias], atol=1e-6)


def test_a_download_or_plan_that_does_not_fit_is_a_plan_mismatch(local):
    lora_plan = ClientPlan(round=1, rank=2, mode="plain", training=SETTINGS)
    with pytest.raises(PlanMismatch, match="does not fit this run"):
        local.start(encode(start_adapter(local, 8)), lora_plan)  # above the run's global rank 4
    head_plan = ClientPlan(round=1, rank=2, mode="head-fit", training=SETTINGS, class_counts=(1, 2))
    start = local.start(encode(start_adapter(local, 4, lora=False)), head_plan)
    with pytest.raises(PlanMismatch, match="head-fit plan"):
        LocalRound(local, head_plan, SETTINGS, "c-1", POWER).run(start)  # 2 class counts for 3 labels


def test_a_model_that_is_not_the_runs_is_refused(run, local):
    with pytest.raises(UserError, match="does not match the server's"):
        LocalModel(run | {"spec_fingerprint": "0" * 16}, local.examples, local.model_dir, trainer=local.trainer)


def test_flower_nodes_load_their_data_once_and_share_one_trainer(run, data_file, tiny_bert_dir, monkeypatch):
    import hetlora_flower.device
    from hetlora_flower.device import LocalNodes, NodeSettings

    loads = []
    real = hetlora_flower.device.load_examples
    monkeypatch.setattr(hetlora_flower.device, "load_examples", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    nodes = LocalNodes()
    a = NodeSettings(name="a", data=str(data_file), model_dir=str(tiny_bert_dir))
    b = replace(a, name="b")
    first = nodes.node(a, run)
    assert nodes.node(a, run) is first and nodes.node(b, run).local.trainer is first.local.trainer
    assert nodes.node(a, run) is first
    assert loads == [str(data_file)] * 2  # once per node, not per message

    plan = ClientPlan(round=0, rank=2, mode="head-statistics", training=SETTINGS)
    first.answer(None, plan.to_json(), "c-a")
    tiny = LocalNodes(max_feature_bytes=1)  # every node's features over the bound: only the newest is kept
    kept = tiny.node(a, run)
    kept.answer(None, plan.to_json(), "c-a")
    tiny.node(b, run)
    assert tiny.node(a, run) is not kept


def test_both_devices_refuse_a_plan_outside_sane_bounds_with_the_same_words(run, data_file, tiny_bert_dir):
    """read_plan is the HTTP client's plan check (plan_of: BadServerAnswer) and the Flower node's (UserError)."""
    from edge_client.answers import BadServerAnswer
    from edge_client.client import plan_of
    from hetlora_flower.device import LocalNodes, NodeSettings

    plan = ClientPlan(round=1, rank=2, mode="plain", training=SETTINGS).to_json()
    plan["training"]["lr"] = float("nan")
    says = "the server's plan is outside sane bounds: lr = nan must be finite and above 0"
    with pytest.raises(BadServerAnswer) as client:
        plan_of({"round": 1, "plan": plan})
    node = LocalNodes().node(NodeSettings(name="a", data=str(data_file), model_dir=str(tiny_bert_dir)), run)
    with pytest.raises(UserError) as flower:
        node.answer(None, plan, "a")
    assert (str(client.value), str(flower.value)) == (f"round 1: {says}", says)


def test_the_profile_a_device_sends_names_its_training_backend(local):
    """The server's tier policy sizes memory per backend (profiles.memory_model): both devices stamp theirs."""
    from profiles.catalog import profile_for

    doc = profile_for("jetson-nano")
    sent = local.profile_for_server(doc)
    assert sent["compute"]["training_backend"] == "torch"
    assert {k: v for k, v in sent["compute"].items() if k != "training_backend"} == doc["compute"]
    assert "training_backend" not in (doc["compute"] or {})  # the caller's document is not changed
