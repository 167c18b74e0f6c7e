"""The configure step: each rule turns (round, client, tier) into the client's plan, and plans survive JSON."""

import hashlib
import json

import pytest

from hetlora.protocol.plan import ClientPlan, Tier, stage_of
from hetlora.protocol.settings import TrainingSettings
from hetlora.engine.aggregation import RULES, make_rule

RUN = dict(global_rank=16, seed=7, training=TrainingSettings(steps=5, batch_size=32, seq_len=128, prune_lambda=0.01))


def plan(rule_name: str, tier: Tier, round_number: int = 3, stage: str = "lora", class_counts=None) -> ClientPlan:
    return make_rule(rule_name).configure(round_number=round_number, client_key="pi-1", tier=tier,
                                          stage=stage, class_counts=class_counts, **RUN)


@pytest.mark.parametrize("rule, rank, mode, min_upload", [("fedavg", 16, "plain", 16), ("hetlora", 8, "hetlora", 1),
                                                         ("hlora", 8, "plain", 1), ("plora", 8, "plora", 8)])
def test_each_rule_plans_its_rank_mode_and_upload_range(rule, rank, mode, min_upload):
    p = plan(rule, Tier(8))
    assert (p.round, p.rank, p.mode, p.min_upload_rank) == (3, rank, mode, min_upload)
    assert (p.indices is not None) == (rule == "plora")


def test_plora_indices_are_distinct_sorted_and_within_the_global_rank():
    p = plan("plora", Tier(5))
    assert len(p.indices) == 5 and list(p.indices) == sorted(set(p.indices)) and max(p.indices) < 16
    assert plan("plora", Tier(5), round_number=4).indices != p.indices or plan("plora", Tier(5), 5).indices != p.indices


def test_training_settings_are_the_runs_within_the_tier_caps_and_seeded_per_client_and_round():
    p = plan("hetlora", Tier(8, batch_size=8, seq_len=256))
    expected_seed = int.from_bytes(hashlib.sha256(json.dumps([7, 3, "pi-1"]).encode()).digest()[:4], "little")
    assert p.training == TrainingSettings(steps=5, batch_size=8, seq_len=128, prune_lambda=0.01, seed=expected_seed)
    assert plan("hetlora", Tier(8)).training.batch_size == 32  # no caps: the run's settings


def test_the_head_round_collects_statistics_without_indices():
    p = plan("plora", Tier(8), round_number=0, stage="head-statistics")
    assert p.mode == "head-statistics" and p.indices is None


@pytest.mark.parametrize("rule", RULES)
def test_a_head_fit_plan_carries_the_pooled_class_counts_and_survives_json(rule):
    p = plan(rule, Tier(8), round_number=2, stage="head-fit", class_counts=[3, 0, 5])
    assert p.mode == "head-fit" and p.indices is None and p.class_counts == (3, 0, 5)
    assert ClientPlan.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(ValueError, match="'class_counts' must not be negative"):
        ClientPlan.from_json(p.to_json() | {"class_counts": [3, -1, 5]})
    with pytest.raises(ValueError, match="only a head-fit plan carries class_counts"):
        ClientPlan.from_json(plan(rule, Tier(8)).to_json() | {"class_counts": [1, 2, 3]})


def test_stages_of_a_run():
    stages = [stage_of(n, head_init=True, head_rounds=2) for n in range(5)]
    assert stages == ["head-statistics", "head-fit", "head-fit", "lora", "lora"]
    assert [stage_of(n, head_init=False, head_rounds=0) for n in range(1, 3)] == ["lora", "lora"]
    assert stage_of(0, head_init=True, head_rounds=0) == "head-statistics" and stage_of(1, head_init=True,
                                                                                        head_rounds=0) == "lora"


@pytest.mark.parametrize("rule", RULES)
def test_a_plan_survives_its_json_form(rule):
    p = plan(rule, Tier(4, batch_size=4))
    assert ClientPlan.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_a_malformed_plan_is_a_one_line_value_error():
    doc = plan("plora", Tier(4)).to_json()
    with pytest.raises(ValueError, match="plora plan needs 4 indices"):
        ClientPlan.from_json(doc | {"indices": None})
    with pytest.raises(ValueError, match="unknown training setting 'steps_per_round'"):
        ClientPlan.from_json(doc | {"training": {"steps_per_round": 3}})
    with pytest.raises(ValueError, match="'rank' must be an integer"):
        ClientPlan.from_json(doc | {"rank": "4"})
    with pytest.raises(ValueError, match="unknown plan mode"):
        ClientPlan.from_json(doc | {"mode": "sgd"})


def test_a_tier_rank_above_the_global_rank_is_refused():
    with pytest.raises(ValueError, match="exceeds the global rank 16"):
        plan("hetlora", Tier(32))


COSINE_OF_4 = (1.0, 0.8535533905932737, 0.5, 0.14644660940672627)  # (1 + cos(pi t / 4)) / 2, t = 0..3, written out


def test_cosine_lr_decay_is_the_closed_form_and_none_changes_nothing():
    base = TrainingSettings(lr=1e-3, head_lr=4e-3)
    for t, factor in enumerate(COSINE_OF_4):
        got = base.decayed("cosine", t, 4)
        assert (got.lr, got.head_lr) == pytest.approx((1e-3 * factor, 4e-3 * factor), rel=1e-12)
        assert got.steps == base.steps and got.schedule == base.schedule
    assert TrainingSettings(lr=1e-3).decayed("cosine", 2, 4).head_lr == pytest.approx(5e-4)  # head_lr None: lr's
    assert base.decayed("none", 3, 4) == base


def test_the_decay_runs_over_the_lora_rounds_only(spec):
    from hetlora.errors import UserError
    from tests.helpers.server import make_config

    training = TrainingSettings(lr=1e-3, head_lr=2e-3)
    config = make_config(spec, head_init="lda", head_rounds=2, rounds=4, lr_decay="cosine", training=training)
    assert [config.training_for(n) for n in (0, 1, 2)] == [training] * 3  # round 0 and the head rounds
    assert [config.training_for(n).lr for n in (3, 4, 5, 6)] == pytest.approx([1e-3 * f for f in COSINE_OF_4])
    plain = make_config(spec, rounds=3, lr_decay="cosine", training=training)  # no head stages: LoRA from round 1
    assert [plain.training_for(n).lr for n in (1, 2, 3)] == pytest.approx([1e-3, 7.5e-4, 2.5e-4])
    assert make_config(spec, rounds=3, training=training).training_for(3) == training
    with pytest.raises(UserError, match="unknown --lr-decay 'linear'; choose none or cosine"):
        make_config(spec, lr_decay="linear")


def test_plans_over_http_carry_each_rounds_decayed_learning_rates(spec, tmp_path):
    from hetlora.protocol.wire import encode
    from tests.helpers.server import make_config, make_update, post_update, register, running_server, upload_meta

    training = TrainingSettings(lr=1e-3, head_lr=2e-3)
    config = make_config(spec, rounds=2, lr_decay="cosine", min_clients=2, clients_per_round=2, training=training)
    with running_server(config, tmp_path / "state") as http:
        clients = [register(http, 8, name=f"dev-{k}") for k in range(2)]
        for number, factor in ((1, 1.0), (2, 0.5)):
            for client in clients:
                info = http.get("/v1/round", headers=client["auth"]).json()
                assert info["round"] == number
                got = info["plan"]["training"]
                assert (got["lr"], got["head_lr"]) == pytest.approx((1e-3 * factor, 2e-3 * factor))
                update = make_update(spec, info["rank"], upload_meta(client, number, info["rank"], 5), seed=number)
                assert post_update(http, client, number, encode(update)).status_code == 201
        assert http.get("/v1/status").json()["finished"] is True
