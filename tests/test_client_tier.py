"""The client never trains with a larger batch or sequence than its device tier implies."""

from edge_client.client import within_tier
from edge_client.train_config import TrainConfig
from profiles.catalog import profile_for
from profiles.policy import decide_tier, load_policy, tiers_of


def test_training_shape_is_capped_at_the_tier():
    phone = profile_for("samsung-galaxy-a54")
    phone["battery"].update(percent=20.0, plugged=False, charging=False)  # low battery: one tier down
    decision = decide_tier(phone, None)
    tier = next(t for t in tiers_of(load_policy()) if t.rank == decision.rank)
    assert tier.batch_size < 64
    cfg = within_tier(TrainConfig(batch_size=64, seq_len=16), phone, decision.rank)
    assert (cfg.batch_size, cfg.seq_len) == (tier.batch_size, 16)


def test_other_profiles_leave_the_run_settings_alone():
    cfg = TrainConfig(batch_size=64, seq_len=256)
    assert within_tier(cfg, {"device": "custom"}, 8) is cfg
