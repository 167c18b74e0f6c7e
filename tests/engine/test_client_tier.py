"""A client's plan never has a larger batch or sequence than its device tier implies."""

from hetlora.protocol.settings import TrainingSettings
from profiles.catalog import profile_for
from profiles.policy import decide_tier, load_policy, tiers_of
from hetlora.engine.aggregation import make_rule
from hetlora.engine.tiers import tier_for


def test_training_shape_is_capped_at_the_tier():
    phone = profile_for("samsung-galaxy-a54")
    phone["battery"].update(percent=20.0, plugged=False, charging=False)  # low battery: one tier down
    decision = decide_tier(phone, None)
    policy_tier = next(t for t in tiers_of(load_policy()) if t.rank == decision.rank)
    assert policy_tier.batch_size < 64
    tier = tier_for(phone, 64, (4, 8, 16, 32, 64))
    plan = make_rule("hetlora").configure(round_number=1, client_key="a54", tier=tier, global_rank=64, seed=0,
                                          training=TrainingSettings(batch_size=64, seq_len=16))
    assert (plan.rank, plan.training.batch_size, plan.training.seq_len) == (decision.rank, policy_tier.batch_size, 16)


def test_other_profiles_leave_the_run_settings_alone():
    tier = tier_for({"device": "custom"}, 8, (4, 8, 16))
    assert (tier.rank, tier.batch_size, tier.seq_len) == (8, None, None)
    plan = make_rule("hlora").configure(round_number=1, client_key="x", tier=tier, global_rank=16, seed=0,
                                        training=TrainingSettings(batch_size=64, seq_len=256))
    assert (plan.training.batch_size, plan.training.seq_len) == (64, 256)
