"""CPU facts: core counts under cgroup quotas, clocks under load, and the Pi's throttle bits."""

from __future__ import annotations

import time

from fakeroots import make_root

from edge_client.device.cpu import FrequencyWatcher, count_cores, decode_throttled, parse_cpu_list, read_cpu
from edge_client.device.host import Host


def test_cpu_list_ranges():
    assert parse_cpu_list("0-3,6,8-9") == {0, 1, 2, 3, 6, 8, 9}
    assert parse_cpu_list("") == set() and parse_cpu_list(None) == set()


def test_throttle_bits_are_named():
    assert decode_throttled(0x0) == (False, [])
    assert decode_throttled(0x50000) == (False, ["under-voltage has occurred", "throttling has occurred"])
    assert decode_throttled(0x8) == (True, ["soft temperature limit now"])


def test_cores_capped_by_cgroup_quota(tmp_path):
    for tree, online, cores in (("container", 8, 2), ("container-v1", 4, 2)):
        root, env = make_root(tree, tmp_path / tree)
        host = Host(root, env)
        assert len(parse_cpu_list(host.read("/sys/devices/system/cpu/online"))) == online
        assert count_cores(host) == cores


def test_clock_below_90_percent_under_load_is_throttling(tmp_path):
    root, env = make_root("raspberry-pi-4", tmp_path)
    host = Host(root, env)
    cpu0 = root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"
    with FrequencyWatcher(host, interval_s=0.01) as watcher:
        cpu0.write_text("1500000\n")  # one core briefly reaches 1500 of 1800 MHz: still below 90%
        time.sleep(0.05)
    assert watcher.peaks_khz == {"cpu0": 1500000, "cpu1": 600000, "cpu2": 600000, "cpu3": 600000}
    cpu = read_cpu(host, watcher.peaks_khz)
    assert cpu["throttled"] is True and cpu["freq_mhz"] == 1500.0
    assert cpu["throttle_reasons"][0] == "cpufreq below 90% of max under load (cpu1: 600 of 1800 MHz)"


def test_full_clock_under_load_is_not_throttling(tmp_path):
    root, env = make_root("jetson-nano-jp4", tmp_path)
    host = Host(root, env)
    with FrequencyWatcher(host) as watcher:
        pass
    assert read_cpu(host, watcher.peaks_khz)["throttled"] is False
    assert read_cpu(host)["throttled"] is None  # idle clocks alone say nothing
