"""Energy meters: integration against closed forms, counters with wraparound, labels never mixed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fakeroots import make_root

from edge_client.device.energy import (EnergyMeter, EnergyResult, combine, counter_energy, integrate_power,
                                       interpolate, meter_for, unwrap)
from edge_client.device.host import Host
from edge_client.device.sources import EstimateSource, discover_sources
from tests.helpers.energy import drive


def power(t: float) -> float:
    """A piecewise-linear power profile (W): 2 -> 6 over [0, 1], 6 until 3, then down 5 W/s."""
    if t <= 1:
        return 2 + 4 * t
    if t <= 3:
        return 6.0
    return 6 - 5 * (t - 3)


# Closed form of the integral of `power` over [0.25, 3.6]:
# [2t + 2t^2] from 0.25 to 1 = 3.375;  6 * 2 = 12;  6 * 0.6 - 2.5 * 0.6^2 = 2.7
WINDOW, WINDOW_J = (0.25, 3.6), 3.375 + 12 + 2.7
SAMPLE_TIMES = [i / 2 for i in range(9)]  # 0, 0.5, ..., 4: the breakpoints are among them


def test_trapezoids_over_a_piecewise_linear_profile_match_the_closed_form():
    watts = [power(t) for t in SAMPLE_TIMES]
    assert integrate_power(SAMPLE_TIMES, watts, *WINDOW) == pytest.approx(WINDOW_J, rel=1e-12)
    assert integrate_power(SAMPLE_TIMES, watts, 0.0, 4.0) == pytest.approx(4 + 12 + 3.5)


def test_interpolation_stays_inside_the_samples():
    assert interpolate([0.0, 2.0], [1.0, 5.0], 0.5) == 2.0
    with pytest.raises(ValueError, match="outside"):
        interpolate([0.0, 2.0], [1.0, 5.0], 2.5)


def test_unwrap_adds_the_range_at_each_wrap():
    assert unwrap([90, 95, 3, 50, 1], wrap=100) == [90, 95, 103, 150, 201]
    with pytest.raises(ValueError, match="wrap value is unknown"):
        unwrap([90, 3], wrap=None)


def test_counter_energy_sums_zones_each_with_its_own_wrap():
    times = [0.0, 1.0, 2.0]
    counters = [(90, 1000), (5, 1400), (20, 1800)]  # zone 0 wraps at 100, zone 1 never does
    # zone 0: 90 -> 105 -> 120, zone 1: 1000 -> 1800; window [0.5, 2]: 22.5 + 600
    assert counter_energy(times, counters, (100, 10_000), 0.5, 2.0) == pytest.approx(22.5 + 600)


def jetson_hwmon(tmp_path) -> tuple[Host, object, Path]:
    root, env = make_root("jetson-orin-nano-jp5", tmp_path)
    host = Host(root, env)
    source = next(s for s in discover_sources(host) if s.name == "jetson-ina3221-hwmon")
    return host, source, root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"


def test_jetson_hwmon_meter_integrates_volts_times_amps(tmp_path):
    _, source, hwmon = jetson_hwmon(tmp_path)

    def set_state(t):  # VDD_IN at 4000 mV and P/4 A, written as the sensor would
        (hwmon / "in1_input").write_text("4000\n")
        (hwmon / "curr1_input").write_text(f"{round(power(t) * 250)}\n")

    result = drive(EnergyMeter(source), set_state, SAMPLE_TIMES, WINDOW)
    assert result.joules == pytest.approx(WINDOW_J, rel=1e-12)
    assert result.seconds == pytest.approx(WINDOW[1] - WINDOW[0])
    assert (result.energy_status, result.scope, result.source) == ("measured", "module", "jetson-ina3221-hwmon")
    assert result.sample_count == len(SAMPLE_TIMES) and result.sample_rate_hz == pytest.approx(2.0)
    assert result.idle_w is None and result.joules_above_idle is None


def test_rapl_meter_unwraps_the_counter_and_interpolates_the_window_edges(tmp_path):
    root, env = make_root("x86-laptop", tmp_path)
    zone = root / "sys/class/powercap/intel-rapl:0"
    wrap = 1_000_000_000
    (zone / "max_energy_range_uj").write_text(f"{wrap}\n")
    rapl = next(s for s in discover_sources(Host(root, env)) if s.name == "rapl")
    start_uj, watts = 999_000_000, 3.0  # wraps after a third of a second, and again later

    def set_state(t):
        (zone / "energy_uj").write_text(f"{round(start_uj + watts * 1e6 * t) % wrap}\n")

    times = [i / 2 for i in range(7)]
    result = drive(EnergyMeter(rapl), set_state, times, (0.2, 2.7))
    assert result.joules == pytest.approx(watts * 2.5, rel=1e-9)
    assert (result.energy_status, result.scope, result.source) == ("measured", "package", "rapl")


def test_counter_going_backwards_without_a_known_range_is_unavailable(tmp_path):
    root, env = make_root("x86-laptop", tmp_path)
    zone = root / "sys/class/powercap/intel-rapl:0"
    (zone / "max_energy_range_uj").unlink()
    rapl = next(s for s in discover_sources(Host(root, env)) if s.name == "rapl")
    result = drive(EnergyMeter(rapl), lambda t: (zone / "energy_uj").write_text(f"{1000 - int(t)}\n"),
                   [0, 1, 2], (0.5, 1.5))
    assert result.energy_status == "unavailable" and result.joules is None
    assert "wrap value is unknown" in result.note


def test_sampler_thread_with_idle_subtracted(tmp_path):
    root, env = make_root("x86-laptop", tmp_path)
    power_now = root / "sys/class/power_supply/BAT0/power_now"
    battery = next(s for s in discover_sources(Host(root, env)) if s.name == "battery-sysfs")
    meter = EnergyMeter(battery, rate_hz=50)
    assert meter.rate_hz == 10.0  # clamped to the source's own limit
    power_now.write_text("4000000\n")
    assert meter.measure_idle(0.25) == pytest.approx(4.0)
    power_now.write_text("9450000\n")
    meter.start()
    deadline = time.monotonic() + 30
    while len(meter.times) < 3 and time.monotonic() < deadline:  # let the thread take two readings
        time.sleep(0.05)
    result = meter.stop()
    assert result.sample_count >= 4  # the opening reading, the thread's, and the closing one
    assert result.joules == pytest.approx(9.45 * result.seconds, rel=1e-9)
    assert result.idle_w == pytest.approx(4.0)
    assert result.joules_above_idle == pytest.approx((9.45 - 4.0) * result.seconds, rel=1e-9)
    assert result.to_json()["mean_w"] == pytest.approx(9.45)


def test_failed_readings_leave_the_window_unavailable(tmp_path):
    root, env = make_root("x86-laptop", tmp_path)
    battery = next(s for s in discover_sources(Host(root, env)) if s.name == "battery-sysfs")
    (root / "sys/class/power_supply/BAT0/power_now").unlink()
    (root / "sys/class/power_supply/BAT0/voltage_now").unlink()
    meter = EnergyMeter(battery)
    meter.start(background=False)
    result = meter.stop()
    assert result.energy_status == "unavailable" and result.joules is None
    assert "too few readings" in result.note and "2 readings failed" in result.note


def test_no_source_is_unavailable_with_a_reason():
    meter = EnergyMeter(None, unavailable_note="Raspberry Pi 4: no power sensor and no catalog figure")
    meter.start()
    result = meter.stop()
    assert (result.energy_status, result.joules, result.scope, result.source) == ("unavailable", None, None, None)
    assert result.note.startswith("Raspberry Pi 4")


def test_estimates_are_labelled_with_their_model(tmp_path):
    root, env = make_root("raspberry-pi-4", tmp_path)
    stat = root / "proc/stat"
    stat.write_text("cpu  0 0 0 0 0 0 0 0 0 0\n")
    source = EstimateSource.device_figure(Host(root, env), idle_w=2.7, load_w=6.4, origin="catalog:raspberry-pi-4")

    def set_state(t):  # fully busy: every jiffy since the last reading is user time
        stat.write_text(f"cpu  {int(t * 400)} 0 0 0 0 0 0 0 0 0\n")

    result = drive(EnergyMeter(source), set_state, [0.0, 1.0, 2.0], (0.0, 2.0))
    assert (result.energy_status, result.scope, result.source) == ("estimated", "estimate", "estimate")
    assert result.model == source.model
    # the first reading has no interval behind it (utilisation 0 -> 2.7 W), then 6.4 W
    assert result.joules == pytest.approx((2.7 + 6.4) / 2 + 6.4)


def labelled(status="measured", scope="module", source="jetson-ina3221-hwmon", joules=2.0, seconds=1.0, model=None):
    return EnergyResult(energy_status=status, scope=scope, source=source, seconds=seconds, joules=joules,
                        sample_count=11, sample_rate_hz=10.0, idle_w=1.0, joules_above_idle=None if joules is None else joules - seconds,
                        model=model)


def test_combine_sums_windows_with_the_same_labels():
    total = combine([labelled(joules=2.0, seconds=1.0), labelled(joules=5.0, seconds=2.0)])
    assert (total.joules, total.seconds, total.sample_count, total.joules_above_idle) == (7.0, 3.0, 22, 4.0)
    assert total.energy_status == "measured" and total.idle_w == 1.0


@pytest.mark.parametrize("other", [
    labelled(status="estimated", scope="estimate", source="estimate", model="device-figure: ..."),
    labelled(scope="package", source="rapl"),
    labelled(status="unavailable", scope=None, source=None, joules=None),
])
def test_combine_refuses_mixed_labels(other):
    with pytest.raises(ValueError, match="different labels"):
        combine([labelled(), other])


def test_meter_for_picks_the_best_source_of_each_device(tmp_path):
    for tree, source, status in (("x86-laptop", "rapl", "measured"), ("jetson-agx-orin-jp6", "jetson-ina3221-hwmon",
                                                                     "measured"),
                                 ("android-phone", "battery-sysfs", "measured"), ("raspberry-pi-5", "pi5-pmic", "measured")):
        root, env = make_root(tree, tmp_path / tree)
        meter = meter_for(Host(root, env))
        assert (meter.source.name, meter.status) == (source, status), tree


def test_meter_for_a_pi4_estimates_from_the_catalog(tmp_path):
    root, env = make_root("raspberry-pi-4", tmp_path)
    (root / "proc/stat").write_text("cpu  0 0 0 0 0 0 0 0 0 0\n")
    meter = meter_for(Host(root, env))
    assert meter.status == "estimated" and "catalog:raspberry-pi-4" in meter.source.model


def test_meter_for_an_unknown_device_is_unavailable_and_says_why(tmp_path):
    root, env = make_root("android-phone", tmp_path)
    (root / "sys/class/power_supply/usb/online").write_text("1\n")
    (root / "sys/class/power_supply/battery/status").write_text("Charging\n")
    (root / "bin").mkdir()
    meter = meter_for(Host(root, {"PATH": str(root / "bin")}))  # no termux-battery-status, no catalog match
    assert meter.status == "unavailable"
    assert "battery-sysfs: on external power" in meter.unavailable_note
