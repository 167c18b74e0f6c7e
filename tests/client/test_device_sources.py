"""Power sources on fake device trees: what each one reads, in which units, and which one a meter picks."""

from __future__ import annotations

import pytest
from fakeroots import make_root

from edge_client.device.host import Host
from edge_client.device.sources import EstimateSource, choose_source, discover_sources, estimate_source
from edge_client.device.sources.pi_pmic import Pi5PmicSource
from edge_client.device.sources.rapl import discover_rapl


def host_for(tree, tmp_path) -> Host:
    root, env = make_root(tree, tmp_path)
    return Host(root, env)


def by_name(host: Host) -> dict:
    return {s.name: s for s in discover_sources(host)}


def test_jetson_jp4_iio_uses_the_module_input_rail(tmp_path):
    source = by_name(host_for("jetson-nano-jp4", tmp_path))["jetson-ina3221-iio"]
    assert source.rails() == {"POM_5V_IN": 3.264, "POM_5V_GPU": 0.12, "POM_5V_CPU": 1.034}
    assert source.read() == 3.264  # the input rail, not the sum of rails
    assert (source.scope, source.units, source.status) == ("module", "mW", "measured")


def test_jetson_jp5_hwmon_multiplies_volts_by_amps_and_skips_the_shunt_sum(tmp_path):
    source = by_name(host_for("jetson-orin-nano-jp5", tmp_path))["jetson-ina3221-hwmon"]
    assert sorted(source.rails()) == ["VDD_CPU_GPU_CV", "VDD_IN", "VDD_SOC"]
    assert source.read() == pytest.approx(5.072 * 1.280)


def test_jetson_without_input_rail_sums_rails_and_skips_nc(tmp_path):
    source = by_name(host_for("jetson-agx-orin-jp6", tmp_path))["jetson-ina3221-hwmon"]
    assert sorted(source.rails()) == ["VDDQ_VDD2_1V8AO", "VDD_CPU_CV", "VDD_GPU_SOC", "VIN_SYS_5V0"]
    assert source.read() == pytest.approx(19.904 * 1.043 + 19.904 * 0.322 + 5.0 * 0.612 + 4.976 * 0.160)
    assert source.describe()["rails"] == sorted(source.rails())


def test_pi5_pmic_pairs_current_and_voltage_by_rail(tmp_path):
    source = by_name(host_for("raspberry-pi-5", tmp_path))["pi5-pmic"]
    rails = source.rails()
    assert "EXT5V" not in rails and "BATT" not in rails and len(rails) == 12
    expected = (0.00390372 * 3.73271200 + 0.05562420 * 3.31253300 + 0.18060360 * 1.79788600
                + 0.02220288 * 1.11172400 + 0.0 * 0.60570000 + 0.18446460 * 1.11098500 + 0.34162440 * 0.80318400
                + 0.69420000 * 0.72188000 + 0.0 * 3.30910000 + 0.00018315 * 3.31078400 + 0.0 * 0.80025000
                + 0.0 * 5.13870000)
    assert source.read() == pytest.approx(expected)
    assert (source.scope, source.max_rate_hz) == ("board", 10.0)


def test_pi4_has_no_power_source(tmp_path):
    host = host_for("raspberry-pi-4", tmp_path)
    assert discover_sources(host) == []
    assert not Pi5PmicSource(host).readable()


def test_android_battery_power_from_sysfs_and_termux_agree(tmp_path):
    sources = by_name(host_for("android-phone", tmp_path))
    sysfs, termux = sources["battery-sysfs"], sources["termux-battery"]
    assert sysfs.read() == pytest.approx(0.512 * 3.85)  # |-512000 uA| * 3850000 uV
    assert termux.read() == pytest.approx(0.512 * 3.85)  # |-512000 uA| * 3850 mV
    assert (sysfs.units, termux.units) == ("uA*uV", "uA*mV")
    assert sysfs.unusable_reason() is None and termux.unusable_reason() is None
    assert (termux.scope, termux.max_rate_hz) == ("battery", 2.0)


def test_battery_on_charger_is_passed_over_for_the_estimate(tmp_path):
    host = host_for("android-phone", tmp_path)
    (host.root / "sys/class/power_supply/usb/online").write_text("1\n")
    (host.root / "sys/class/power_supply/battery/status").write_text("Charging\n")
    (host.root / "proc/stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    sources = [s for s in discover_sources(host) if s.name == "battery-sysfs"]
    estimate = estimate_source(host, {"idle_w": 0.9, "load_w": 6.0}, "catalog:google-pixel-8-pro")
    chosen, passed_over = choose_source(sources, estimate)
    assert chosen is estimate and chosen.status == "estimated"
    assert passed_over == ["battery-sysfs: on external power: battery power measures the device only while unplugged"]


def test_laptop_prefers_rapl_and_falls_back_to_battery_when_rapl_is_root_only(tmp_path):
    host = host_for("x86-laptop", tmp_path)
    sources = discover_sources(host)
    assert [s.name for s in sources] == ["rapl", "battery-sysfs"]  # the mouse battery (scope Device) is not one
    rapl = sources[0]
    assert rapl.cumulative and rapl.read() == (123456789,) and rapl.ranges == (262143328850,)
    assert choose_source(sources) == (rapl, [])
    (host.root / "sys/class/powercap/intel-rapl:0/energy_uj").unlink()  # as if denied to non-root
    assert rapl.describe()["readable"] is False
    chosen, passed_over = choose_source(sources)
    assert chosen.name == "battery-sysfs" and chosen.read() == pytest.approx(9.45)
    assert passed_over == ["rapl: not readable"]


def test_rapl_psys_is_a_board_source(tmp_path):
    host = host_for("x86-laptop", tmp_path)
    psys = host.root / "sys/class/powercap/intel-rapl:1"
    psys.mkdir()
    (psys / "name").write_text("psys\n")
    (psys / "energy_uj").write_text("42\n")
    (psys / "max_energy_range_uj").write_text("262143328850\n")
    assert [(s.name, s.scope, s.read()) for s in discover_rapl(host)] == [("rapl", "package", (123456789,)),
                                                                         ("rapl-psys", "board", (42,))]


def test_estimate_from_rapl_power_limit_is_a_named_tdp_fraction(tmp_path):
    host = host_for("x86-laptop", tmp_path)
    stat = host.root / "proc/stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    source = estimate_source(host)
    assert source.model.startswith("tdp-fraction: P = 28 W x CPU utilisation")
    # +300 busy (user 200, system 100) and +100 idle jiffies: utilisation 0.75
    stat.write_text("cpu  300 0 200 900 0 0 0 0 0 0\n")
    assert source.read() == pytest.approx(28 * 0.75)
    assert source.read() == pytest.approx(28 * 0.75)  # no tick since: the last utilisation holds


def test_estimate_from_a_device_figure(tmp_path):
    host = host_for("raspberry-pi-4", tmp_path)
    stat = host.root / "proc/stat"
    stat.write_text("cpu  0 0 0 0 0 0 0 0 0 0\n")
    source = EstimateSource.device_figure(host, idle_w=2.7, load_w=6.4, origin="catalog:raspberry-pi-4")
    stat.write_text("cpu  50 0 0 40 10 0 0 0 0 0\n")  # iowait counts as idle: utilisation 0.5
    assert source.read() == pytest.approx(2.7 + (6.4 - 2.7) * 0.5)
    assert source.describe()["model"] == source.model and "catalog:raspberry-pi-4" in source.model


def test_no_estimate_without_a_figure(tmp_path):
    assert estimate_source(host_for("raspberry-pi-4", tmp_path)) is None


def test_profile_entries_describe_each_source(tmp_path):
    entry = by_name(host_for("x86-laptop", tmp_path))["rapl"].describe()
    assert entry == {"name": "rapl", "scope": "package", "path": entry["path"], "units": "uJ", "readable": True,
                     "status": "measured", "max_rate_hz": 100.0}
    assert entry["path"].endswith("sys/class/powercap/intel-rapl:0")
