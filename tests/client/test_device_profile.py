"""The profile document on fake device trees, and `hetlora profile` on this machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fakeroots import make_root

from edge_client.device.profile import collect_profile, lowest_tier, validate_profile
from hetlora.cli import main
from profiles.policy import DEFAULT_POLICY_PATH

KB, GIB, MIB = 1024, 1 << 30, 1 << 20


def ident(platform, model, vendor, arch, os_name, jetpack=None, catalog_id=None, power_mode=None):
    return {"platform": platform, "model": model, "vendor": vendor, "arch": arch, "os": os_name,
            "jetpack": jetpack, "power_mode": power_mode, "catalog_id": catalog_id}


def mem(total, available, limit=None, usable=None):
    return {"total_bytes": total, "available_bytes": available, "cgroup_limit_bytes": limit,
            "usable_bytes": available if usable is None else usable}


NO_BATTERY = {"present": False, "percent": None, "plugged": None, "charging": None, "power_w": None, "source": "none"}
# 0.512 A * 3.85 V, the same discharge seen through sysfs (uA, uV) and termux (uA, mV)
PHONE_W = 0.512 * 3.85

EXPECTED = {
    "jetson-nano-jp4": dict(
        identity=ident("jetson", "NVIDIA Jetson Nano Developer Kit", "NVIDIA", "aarch64", "Linux 4.9", "R32.7.1",
                       "jetson-nano", "5W"),
        memory=mem(4059116 * KB, 2515000 * KB), battery=NO_BATTERY, sources=["jetson-ina3221-iio"],
        cpu=(4, 1479.0, 1479.0, None, []), max_c=41.0),
    "jetson-orin-nano-jp5": dict(
        identity=ident("jetson", "NVIDIA Jetson Orin Nano Developer Kit", "NVIDIA", "aarch64", "Linux 5.10",
                       "R35.4.1", "jetson-orin-nano", "15W"),
        memory=mem(7620000 * KB, 6100000 * KB), battery=NO_BATTERY, sources=["jetson-ina3221-hwmon"],
        cpu=(6, 1510.4, 1510.4, None, []), max_c=47.531),
    "jetson-agx-orin-jp6": dict(
        identity=ident("jetson", "NVIDIA Jetson AGX Orin Developer Kit", "NVIDIA", "aarch64", "Linux 5.15",
                       "R36.4.0", "jetson-agx-orin", "MAXN"),
        memory=mem(31000000 * KB, 28000000 * KB), battery=NO_BATTERY, sources=["jetson-ina3221-hwmon"],
        cpu=(12, 2201.6, 2201.6, None, []), max_c=None),
    "raspberry-pi-4": dict(
        identity=ident("raspberry-pi", "Raspberry Pi 4 Model B Rev 1.4", "Raspberry Pi Foundation", "aarch64",
                       "Linux 6.1", None, "raspberry-pi-4"),
        memory=mem(3885396 * KB, 3300000 * KB), battery=NO_BATTERY, sources=[],
        # 0x50005: under-voltage and throttling now, and both have occurred since boot
        cpu=(4, 600.0, 1800.0, True, ["under-voltage now", "throttled now", "under-voltage has occurred",
                                      "throttling has occurred"]), max_c=48.5),
    "raspberry-pi-5": dict(
        identity=ident("raspberry-pi", "Raspberry Pi 5 Model B Rev 1.0", "Raspberry Pi Foundation", "aarch64",
                       "Linux 6.6", None, "raspberry-pi-5"),
        memory=mem(8245000 * KB, 7600000 * KB), battery=NO_BATTERY, sources=["pi5-pmic"],
        cpu=(4, 2400.0, 2400.0, False, []), max_c=55.15),
    "android-phone": dict(
        identity=ident("android", "Pixel 7a", "Google", "aarch64", "Linux 5.10"),
        memory=mem(7700000 * KB, 3100000 * KB), sources=["battery-sysfs", "termux-battery"],
        battery={"present": True, "percent": 64.0, "plugged": False, "charging": False, "power_w": PHONE_W,
                 "source": "sysfs"},
        cpu=(8, 1803.0, 2850.0, None, []), max_c=39.2),
    "android-termux-only": dict(
        identity=ident("android", "Pixel 7a", "Google", "aarch64", "Linux 5.10"),
        memory=mem(7700000 * KB, 3100000 * KB), sources=["termux-battery"],
        battery={"present": True, "percent": 64.0, "plugged": False, "charging": False, "power_w": PHONE_W,
                 "source": "termux"},
        cpu=(8, 1803.0, 2850.0, None, []), max_c=31.2),
    "x86-laptop": dict(
        identity=ident("linux-x86", "ThinkPad T14 Gen 3", "LENOVO", "x86_64", "Linux 6.8", None,
                       "thinkpad-t14-gen3-amd"),
        memory=mem(32500000 * KB, 24000000 * KB), sources=["rapl", "battery-sysfs"],
        battery={"present": True, "percent": 77.0, "plugged": False, "charging": False, "power_w": 9.45,
                 "source": "sysfs"},
        cpu=(8, 1400.0, 4768.0, None, []), max_c=52.0),
    "container": dict(
        identity=ident("linux-x86", None, None, "x86_64", "Linux 6.1"),
        # limit on the pod cgroup: 2 GiB - 512 MiB in use; cpu.max 1.5 cores -> 2
        memory=mem(32000000 * KB, 20000000 * KB, 2 * GIB, 2 * GIB - 512 * MIB), battery=NO_BATTERY, sources=[],
        cpu=(2, 2000.0, 2000.0, None, []), max_c=None),
    "container-v1": dict(
        identity=ident("linux-x86", None, None, "x86_64", "Linux 5.4"),
        memory=mem(16000000 * KB, 12000000 * KB, GIB, GIB - 256 * MIB), battery=NO_BATTERY, sources=[],
        cpu=(2, 2000.0, 2000.0, None, []), max_c=None),
}


@pytest.mark.parametrize("tree", sorted(EXPECTED))
def test_profile_of_fake_device(tree, tmp_path):
    root, env = make_root(tree, tmp_path)
    doc = collect_profile(root, quick=True, env=env)
    want = EXPECTED[tree]
    assert validate_profile(doc) == []
    assert doc["quick"] is True and doc["compute"] is None
    assert doc["identity"] == want["identity"]
    assert doc["memory"] == want["memory"]
    assert doc["battery"].keys() == want["battery"].keys()
    for key, value in want["battery"].items():
        assert doc["battery"][key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert [s["name"] for s in doc["power_sources"]] == want["sources"]
    cpu = doc["cpu"]
    assert (cpu["cores"], cpu["freq_mhz"], cpu["max_freq_mhz"], cpu["throttled"], cpu["throttle_reasons"]) == want["cpu"]
    assert doc["thermal"]["max_c"] == want["max_c"]
    assert json.loads(json.dumps(doc)) == doc


def test_jetson_pmic_zone_is_listed_but_not_the_maximum(tmp_path):
    root, env = make_root("jetson-nano-jp4", tmp_path)
    thermal = collect_profile(root, quick=True, env=env)["thermal"]
    assert thermal["zones"]["PMIC-Die"] == 100.0
    assert thermal["max_c"] == 41.0


def test_battery_on_charger_reports_no_power(tmp_path):
    root, env = make_root("x86-laptop", tmp_path)
    (root / "sys/class/power_supply/AC/online").write_text("1\n")
    (root / "sys/class/power_supply/BAT0/status").write_text("Charging\n")
    battery = collect_profile(root, quick=True, env=env)["battery"]
    assert (battery["plugged"], battery["charging"], battery["power_w"]) == (True, True, None)


def test_missing_files_are_null_not_guessed(tmp_path):
    (tmp_path / "root").mkdir()
    doc = collect_profile(tmp_path / "root", quick=True, env={"PATH": str(tmp_path)})
    assert validate_profile(doc) == []
    assert doc["identity"] == ident("other", None, None, None, None)
    assert doc["memory"] == {"total_bytes": None, "available_bytes": None, "cgroup_limit_bytes": None,
                             "usable_bytes": None}
    assert doc["cpu"] == {"cores": None, "freq_mhz": None, "max_freq_mhz": None, "throttled": None,
                          "throttle_reasons": []}
    assert doc["thermal"] == {"zones": {}, "max_c": None}
    assert doc["power_sources"] == []


def test_validate_profile_names_the_problems():
    assert validate_profile([]) == ["a profile is a JSON object"]
    problems = validate_profile({"schema": "hetlora-profile", "version": 1, "cpu": []})
    assert "missing section 'identity'" in problems and "section 'cpu' has the wrong type" in problems


def test_cli_quick_json_on_this_machine(tmp_path):
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, "-m", "hetlora.cli", "profile", "--quick", "--json", "--out", str(out)],
                          capture_output=True, text=True, check=True)
    doc = json.loads(done.stdout)
    assert validate_profile(doc) == []
    assert doc["quick"] is True and doc["compute"] is None
    assert doc["identity"]["arch"] and doc["memory"]["total_bytes"] > 0 and doc["cpu"]["cores"] >= 1
    assert json.loads(out.read_text())["identity"] == doc["identity"]


def test_cli_table_on_fake_tree(tmp_path, capsys, monkeypatch):
    root, env = make_root("raspberry-pi-4", tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])  # the fake vcgencmd
    assert main(["profile", "--quick", "--root", str(root)]) == 0
    table = capsys.readouterr().out
    assert "Raspberry Pi 4 Model B Rev 1.4" in table
    assert "throttled: YES (under-voltage now" in table
    assert "not measured (--quick)" in table


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["profile", "--quick", "--step"]) == 2
    assert "--step" in capsys.readouterr().err
    assert main(["profile", "--model", str(tmp_path)]) == 2
    assert "add --step" in capsys.readouterr().err
    assert main(["profile", "--step", "--model", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["profile", "--quick", "--root", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["profile", "--quick", "--root", str(tmp_path), "--out", str(tmp_path / "no" / "dir.json")]) == 2
    assert "cannot write the profile" in capsys.readouterr().err


def test_cli_tier_uses_the_policy(tmp_path, capsys):
    root, _ = make_root("container", tmp_path)
    assert main(["profile", "--quick", "--json", "--tier", "--root", str(root)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert validate_profile(doc) == []
    assert isinstance(doc["tier"]["rank"], int) and doc["tier"]["reasons"]
    assert main(["profile", "--profile-as", "raspberry-pi-4"]) == 0
    out = capsys.readouterr().out
    assert "raspberry-pi-4" in out and "Tier" in out


def test_getprop_outside_termux_path_is_found_in_system_bin(tmp_path):
    root, env = make_root("android-phone", tmp_path)
    (root / "system/bin").mkdir(parents=True)
    (tmp_path / "bin/getprop").rename(root / "system/bin/getprop")
    identity = collect_profile(root, quick=True, env=env)["identity"]
    assert (identity["model"], identity["vendor"]) == ("Pixel 7a", "Google")


def test_commands_go_through_an_injectable_runner(tmp_path):
    root, _ = make_root("raspberry-pi-4", tmp_path)
    calls = []

    def runner(argv):
        calls.append(argv)
        return "throttled=0x4\n" if argv == ["vcgencmd", "get_throttled"] else None

    cpu = collect_profile(root, quick=True, env={}, runner=runner)["cpu"]
    assert (cpu["throttled"], cpu["throttle_reasons"]) == (True, ["throttled now"])
    assert ["vcgencmd", "get_throttled"] in calls


def test_lora_step_runs_at_the_lowest_tier_of_the_policy_file(tmp_path):
    doc = json.loads(DEFAULT_POLICY_PATH.read_text())
    first = next(t for t in doc["tiers"] if t["rank"] > 0)
    first.update(batch_size=2, seq_len=32)
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps(doc))
    assert lowest_tier(path) == {"rank": first["rank"], "batch_size": 2, "seq_len": 32}
