"""The device catalog: entries validate, profiles built from them, identity matching, the simulated fleet,
and the server assigning the policy's rank to a client that registers with a catalog profile over HTTP."""

from __future__ import annotations

import copy
import json

import pytest

from hetlora.errors import UserError
from profiles import catalog
from profiles.catalog import list_devices, match_catalog_id, profile_for, simulated_fleet, validate_device
from profiles.policy import decide_tier

EXPECTED_DEVICES = {"raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano", "jetson-agx-orin",
                    "samsung-galaxy-a54", "google-pixel-8-pro", "thinkpad-t14-gen3-amd"}


def test_catalog_has_the_required_devices_with_sources():
    assert set(list_devices()) == EXPECTED_DEVICES
    for cid in list_devices():
        d = catalog.device(cid)
        assert set(d["sources"]) >= {"cpu", "memory", "compute", "power"}
        assert "estimate" in d["sources"]["compute"]  # GFLOPS figures are derived, and say so
        assert d["compute"]["sustained_gflops"] <= d["compute"]["peak_gflops"]


def test_profile_for_is_a_profile_document_of_that_device():
    p = profile_for("jetson-orin-nano")
    assert p["schema"] == "hetlora-profile" and p["version"] == 1
    assert p["identity"]["catalog_id"] == "jetson-orin-nano" and p["identity"]["platform"] == "jetson"
    assert p["memory"]["usable_bytes"] == catalog.device("jetson-orin-nano")["memory"]["typical_available_bytes"]
    assert p["compute"]["source"] == "catalog"
    p["memory"]["usable_bytes"] = 1  # callers get a fresh copy every time
    assert profile_for("jetson-orin-nano")["memory"]["usable_bytes"] > 1


def test_unknown_device_lists_the_catalog():
    with pytest.raises(UserError, match="unknown device 'pi-9'.*raspberry-pi-4"):
        profile_for("pi-9")


@pytest.mark.parametrize("model,expected", [
    ("Raspberry Pi 4 Model B Rev 1.2", "raspberry-pi-4"),
    ("Raspberry Pi 5 Model B Rev 1.0", "raspberry-pi-5"),
    ("NVIDIA Jetson Nano Developer Kit", "jetson-nano"),
    ("NVIDIA Jetson Orin Nano Developer Kit", "jetson-orin-nano"),
    ("Jetson AGX Orin", "jetson-agx-orin"),
    ("SM-A546E", "samsung-galaxy-a54"),
    ("Pixel 8 Pro", "google-pixel-8-pro"),
    ("Pixel 8", None),
    ("ThinkPad T14 Gen 3", "thinkpad-t14-gen3-amd"),
    ("Standard PC (Q35 + ICH9, 2009)", None),
    (None, None),
])
def test_identity_matching(model, expected):
    assert match_catalog_id({"model": model}) == expected


def _entry():
    return copy.deepcopy(catalog.device("raspberry-pi-4"))


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["memory"].pop("total_bytes"), "missing field memory.total_bytes"),
    (lambda d: d["cpu"].update(cores="4"), "cpu.cores has the wrong type"),
    (lambda d: d["identity"].update(platform="toaster"), "identity.platform 'toaster'"),
    (lambda d: d["compute"].update(sustained_gflops=100.0), "sustained_gflops exceeds"),
    (lambda d: d["memory"].update(typical_available_bytes=5_000_000_000), "exceeds memory.total_bytes"),
    (lambda d: d["identity"].update(match=[]), "identity.match"),
    (lambda d: d.pop("sources"), "missing field sources.cpu"),
    (lambda d: d.update(schema="other"), "hetlora-device"),
])
def test_invalid_entries_are_rejected_with_the_field(mutate, message):
    doc = _entry()
    mutate(doc)
    with pytest.raises(UserError, match=message):
        validate_device(doc, "bad.json")


def test_catalog_folder_errors_name_the_file(tmp_path, monkeypatch):
    entry = _entry()
    monkeypatch.setattr(catalog, "DEVICES_DIR", tmp_path)
    catalog._catalog.cache_clear()
    try:
        (tmp_path / "pi.json").write_text(json.dumps(entry))
        with pytest.raises(UserError, match="pi.json: id 'raspberry-pi-4' must equal the file name"):
            list_devices()
        catalog._catalog.cache_clear()
        (tmp_path / "pi.json").write_text("{not json")
        with pytest.raises(UserError, match="pi.json is not valid JSON"):
            list_devices()
    finally:
        catalog._catalog.cache_clear()


def test_simulated_fleet_is_reproducible_and_spans_tiers():
    fleet = simulated_fleet(12, seed=3)
    assert fleet == simulated_fleet(12, seed=3)
    assert fleet != simulated_fleet(12, seed=4)
    assert {p["identity"]["catalog_id"] for p in fleet[:8]} == EXPECTED_DEVICES  # all before any repeats
    tiers = {decide_tier(p).tier for p in fleet}
    assert len(tiers) >= 3, tiers
    with pytest.raises(UserError, match="at least one device"):
        simulated_fleet(0)


# --- the server assigns the policy's rank at registration (real HTTP, real SQLite) ----------------------

def test_server_assigns_the_policy_rank_to_a_registered_catalog_profile(tiny_bert_dir, tmp_path):
    from tests.helpers.server import LABELS, TARGETS, make_config, running_server

    from hetlora.models.adapter_spec import derive_spec

    spec = derive_spec(tiny_bert_dir, "classification", TARGETS, num_labels=len(LABELS))
    config = make_config(spec, ranks=(4, 8, 16, 32, 64), global_rank=64, min_clients=10)
    nano, laptop = profile_for("jetson-nano"), profile_for("thinkpad-t14-gen3-amd")
    assert decide_tier(nano, spec=spec).rank == 16 and decide_tier(laptop, spec=spec).rank == 64
    starved = profile_for("raspberry-pi-4") | {"memory": {"usable_bytes": 100_000_000}}

    def register(profile, requested):
        return http.post("/v1/register", json={"profile": profile, "requested_rank": requested, "n_samples": 5})

    with running_server(config, tmp_path / "state") as http:
        assert register(nano, 64).json()["rank"] == 16  # the policy's rank
        assert register(laptop, 32).json()["rank"] == 32  # capped by the request
        assert register({"device": "test"}, 16).json()["rank"] == 16  # not a hetlora-profile: request only
        reply = register(starved, 64)
        assert reply.status_code == 422, reply.text
        error = reply.json()["error"]
        assert error["code"] == "cannot_train" and "memory" in error["message"]
        reply = register(nano | {"memory": {"usable_bytes": "lots"}}, 16)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "bad_profile"
        assert "memory.usable_bytes" in reply.json()["error"]["message"]


def test_server_rank_follows_fresh_profiles_with_hysteresis(tiny_bert_dir, tmp_path):
    """POST /v1/profile: low battery moves down at once; back on the charger the rank only moves up again
    when the higher tier fits with the policy's headroom (the server passes the client's current rank)."""
    from tests.helpers.server import LABELS, TARGETS, make_config, running_server

    from hetlora.models.adapter_spec import derive_spec
    from profiles import cost
    from profiles.memory_model import ModelShape
    from profiles.policy import load_policy

    spec = derive_spec(tiny_bert_dir, "classification", TARGETS, num_labels=len(LABELS))
    config = make_config(spec, ranks=(4, 8, 16, 32, 64), global_rank=64, min_clients=10)
    policy = load_policy()
    th, minilm = policy["thresholds"], ModelShape.from_config(policy["model"]["config"])
    # GFLOPS at which r64's local steps exactly fill the round budget: 5% above it r64 fits, without headroom.
    g0 = (th["local_steps_per_round"] * cost.step_flops(minilm, 16, 128, spec.lora_parameter_count(64))
          / (th["round_compute_budget_s"] * th["training_efficiency"] * 1e9))

    def laptop(gflops, battery_percent=100.0, plugged=True):
        doc = profile_for("thinkpad-t14-gen3-amd")
        doc["compute"]["sustained_gflops"] = gflops
        doc["battery"].update(percent=battery_percent, plugged=plugged)
        return doc

    with running_server(config, tmp_path / "state") as http:
        reply = http.post("/v1/register", json={"profile": laptop(g0 * 1.05), "requested_rank": 64, "n_samples": 5})
        auth = {"Authorization": f"Bearer {reply.json()['token']}"}
        assert reply.json()["rank"] == 64

        def report(profile):
            reply = http.post("/v1/profile", json={"profile": profile}, headers=auth)
            assert reply.status_code == 200, reply.text
            return reply.json()["rank"]

        assert report(laptop(g0 * 1.05, battery_percent=10.0, plugged=False)) == 32  # step down at once
        assert report(laptop(g0 * 1.05)) == 32  # r64 fits, but not with headroom: stays
        assert report(laptop(g0 * 1.5)) == 64  # fits with headroom: moves up
