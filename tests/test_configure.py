"""The configure step: each rule turns (round, client, tier) into the client's plan, and plans survive JSON."""

import hashlib
import json

import pytest

from hetlora.protocol.plan import ClientPlan, Tier, stage_of
from hetlora.protocol.settings import TrainingSettings
from server_stub.aggregation import RULES, make_rule

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
