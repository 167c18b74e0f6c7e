"""Fake /sys, /proc and /etc trees of real device kinds, plus fake external commands.

`make_root(name, dest)` writes tree `name` under `dest/root` and its commands (shell scripts
that print recorded output) under `dest/bin`, and returns (root, env) with env PATH = that bin
only. File contents follow the kernel's formats and units (INA3221 hwmon: mV and mA; power_supply:
uA, uV, uW; RAPL energy_uj: cumulative uJ that wraps at max_energy_range_uj).
Tests may rewrite files afterwards (advance counters, change power).
"""

from __future__ import annotations

import shutil
from pathlib import Path

RECORDED = Path(__file__).with_name("recorded")
TERMUX_PREFIX = "/data/data/com.termux/files/usr"


def _kernel(arch: str, release: str) -> dict[str, str]:
    return {"proc/sys/kernel/arch": arch, "proc/sys/kernel/ostype": "Linux", "proc/sys/kernel/osrelease": release}


def _meminfo(total_kb: int, available_kb: int) -> dict[str, str]:
    return {"proc/meminfo": f"MemTotal:       {total_kb} kB\nMemFree:        {available_kb // 2} kB\n"
                            f"MemAvailable:   {available_kb} kB\nBuffers:          12345 kB\n"}


def _cpus(n: int, cur_khz: int, max_khz: int) -> dict[str, str]:
    files = {"sys/devices/system/cpu/online": f"0-{n - 1}"}
    for i in range(n):
        files[f"sys/devices/system/cpu/cpu{i}/cpufreq/scaling_cur_freq"] = str(cur_khz)
        files[f"sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq"] = str(max_khz)
    return files


def _thermal(zones: list[tuple[str, int]]) -> dict[str, str]:
    files = {}
    for i, (kind, millideg) in enumerate(zones):
        files[f"sys/class/thermal/thermal_zone{i}/type"] = kind
        files[f"sys/class/thermal/thermal_zone{i}/temp"] = str(millideg)
    return files


def _supply(name: str, **attrs) -> dict[str, str]:
    return {f"sys/class/power_supply/{name}/{key}": str(value) for key, value in attrs.items()}


def _hwmon(device: str, hwmon: str, channels: dict[int, tuple[str, int, int]]) -> dict[str, str]:
    """JetPack 5/6 INA3221: channel -> (label, mV, mA)."""
    base = f"sys/bus/i2c/drivers/ina3221/{device}/hwmon/{hwmon}"
    files = {f"{base}/name": "ina3221"}
    for n, (label, mv, ma) in channels.items():
        files.update({f"{base}/in{n}_label": label, f"{base}/in{n}_input": str(mv), f"{base}/curr{n}_input": str(ma)})
    return files


JETSON_NANO_JP4 = {
    "proc/device-tree/model": "NVIDIA Jetson Nano Developer Kit\x00",
    "etc/nv_tegra_release": "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
                            "DATE: Sat Feb 19 17:05:08 UTC 2022\n",
    **_kernel("aarch64", "4.9.253-tegra"), **_meminfo(4059116, 2515000), **_cpus(4, 1479000, 1479000),
    **_thermal([("AO-therm", 40500), ("CPU-therm", 41000), ("GPU-therm", 39500), ("PMIC-Die", 100000)]),
    # iio layout, in_power in mW; POM_5V_IN is the module input.
    "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/rail_name_0": "POM_5V_IN",
    "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input": "3264",
    "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/rail_name_1": "POM_5V_GPU",
    "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power1_input": "120",
    "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/rail_name_2": "POM_5V_CPU",
    "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power2_input": "1034",
}

JETSON_ORIN_NANO_JP5 = {
    "proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\x00",
    "etc/nv_tegra_release": "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
                            "DATE: Tue Aug  1 19:57:35 UTC 2023\n",
    **_kernel("aarch64", "5.10.120-tegra"), **_meminfo(7620000, 6100000), **_cpus(6, 1510400, 1510400),
    **_thermal([("cpu-thermal", 47531), ("gpu-thermal", 46250), ("soc0-thermal", 46718)]),
    **_hwmon("1-0040", "hwmon3", {1: ("VDD_IN", 5072, 1280), 2: ("VDD_CPU_GPU_CV", 5072, 416),
                                  3: ("VDD_SOC", 5072, 528), 7: ("sum of shunt voltages", 15216, 2224)}),
}

# AGX Orin (JetPack 6) has no input rail: its rails are summed; "NC" channels are not connected.
JETSON_AGX_ORIN_JP6 = {
    "proc/device-tree/model": "NVIDIA Jetson AGX Orin Developer Kit\x00",
    "etc/nv_tegra_release": "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
                            "DATE: Fri Sep 13 04:36:44 UTC 2024\n",
    **_kernel("aarch64", "5.15.148-tegra"), **_meminfo(31000000, 28000000), **_cpus(12, 2201600, 2201600),
    **_hwmon("1-0040", "hwmon1", {1: ("VDD_GPU_SOC", 19904, 1043), 2: ("VDD_CPU_CV", 19904, 322),
                                  3: ("VIN_SYS_5V0", 5000, 612), 7: ("sum of shunt voltages", 44808, 1977)}),
    **_hwmon("1-0041", "hwmon2", {1: ("NC", 0, 999), 2: ("VDDQ_VDD2_1V8AO", 4976, 160), 3: ("NC", 0, 999)}),
}

RASPBERRY_PI_4 = {
    "proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\x00",
    **_kernel("aarch64", "6.1.21-v8+"), **_meminfo(3885396, 3300000), **_cpus(4, 600000, 1800000),
    **_thermal([("cpu-thermal", 48500)]),
}

RASPBERRY_PI_5 = {
    "proc/device-tree/model": "Raspberry Pi 5 Model B Rev 1.0\x00",
    **_kernel("aarch64", "6.6.51+rpt-rpi-2712"), **_meminfo(8245000, 7600000), **_cpus(4, 2400000, 2400000),
    **_thermal([("cpu-thermal", 55150)]),
}

ANDROID_PHONE = {
    "system/build.prop": "ro.build.version.release=14\n",
    "proc/device-tree/model": "GS201 LYNX MP based on GS201\x00",
    **_kernel("aarch64", "5.10.198-android13-4-00050"), **_meminfo(7700000, 3100000), **_cpus(8, 1803000, 2850000),
    **_thermal([("BIG", 39200), ("MID", 38100), ("LITTLE", 37000), ("battery", 31200)]),
    # Discharging: this vendor reports current as negative uA; voltage in uV.
    **_supply("battery", type="Battery", status="Discharging", capacity=64, current_now=-512000, voltage_now=3850000,
              temp=312),
    **_supply("usb", type="USB", online=0),
    **_supply("wireless", type="Wireless", online=0),
}
# SELinux hides the battery sysfs and the thermal zones from apps on many phones: only
# termux-battery-status is left (its temperature becomes the "battery" zone).
ANDROID_TERMUX_ONLY = {k: v for k, v in ANDROID_PHONE.items()
                       if not k.startswith(("sys/class/power_supply", "sys/class/thermal"))}

X86_LAPTOP = {
    "sys/devices/virtual/dmi/id/sys_vendor": "LENOVO",
    "sys/devices/virtual/dmi/id/product_name": "21CF002UGE",
    "sys/devices/virtual/dmi/id/product_version": "ThinkPad T14 Gen 3",
    **_kernel("x86_64", "6.8.0-45-generic"), **_meminfo(32500000, 24000000), **_cpus(8, 1400000, 4768000),
    **_thermal([("acpitz", 45000), ("thinkpad", 52000)]),
    **_supply("AC", type="Mains", online=0),
    **_supply("BAT0", type="Battery", status="Discharging", capacity=77, power_now=9450000, voltage_now=16800000),
    **_supply("hidpp_battery_0", type="Battery", scope="Device", status="Discharging", capacity=50),
    # AMD exposes its package counter through the same powercap "intel-rapl" zones.
    "sys/class/powercap/intel-rapl:0/name": "package-0",
    "sys/class/powercap/intel-rapl:0/energy_uj": "123456789",
    "sys/class/powercap/intel-rapl:0/max_energy_range_uj": "262143328850",
    "sys/class/powercap/intel-rapl:0/constraint_0_power_limit_uw": "28000000",
    "sys/class/powercap/intel-rapl:0:0/name": "core",
    "sys/class/powercap/intel-rapl:0:0/energy_uj": "50000000",
    "sys/class/powercap/intel-rapl:0:0/max_energy_range_uj": "262143328850",
}

# A container: cgroup v2, the limit set on the pod (the container's own cgroup says "max").
CONTAINER = {
    **_kernel("x86_64", "6.1.0-18-cloud-amd64"), **_meminfo(32000000, 20000000), **_cpus(8, 2000000, 2000000),
    "proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
    "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids",
    "sys/fs/cgroup/kubepods/pod1/memory.max": str(2 << 30),
    "sys/fs/cgroup/kubepods/pod1/memory.current": str(512 << 20),
    "sys/fs/cgroup/kubepods/pod1/ctr/memory.max": "max",
    "sys/fs/cgroup/kubepods/pod1/ctr/memory.current": str(400 << 20),
    "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "150000 100000",
}

# cgroup v1 (older Docker): memory.limit_in_bytes under the container's path; the root says "unlimited".
CONTAINER_V1 = {
    **_kernel("x86_64", "5.4.0-150-generic"), **_meminfo(16000000, 12000000), **_cpus(4, 2000000, 2000000),
    "proc/self/cgroup": "12:memory:/docker/abc123\n5:cpu,cpuacct:/docker/abc123\n",
    "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
    "sys/fs/cgroup/memory/memory.usage_in_bytes": str(6 << 30),
    "sys/fs/cgroup/memory/docker/abc123/memory.limit_in_bytes": str(1 << 30),
    "sys/fs/cgroup/memory/docker/abc123/memory.usage_in_bytes": str(256 << 20),
    "sys/fs/cgroup/cpu/docker/abc123/cpu.cfs_quota_us": "200000",
    "sys/fs/cgroup/cpu/docker/abc123/cpu.cfs_period_us": "100000",
}


def _script(body: str) -> str:
    return "#!/bin/sh\n" + body


VCGENCMD_PI4 = _script('case "$1" in\n  get_throttled) echo "throttled=0x50005" ;;\n'
                       '  *) echo "error=1 error_msg=\\"Command not registered\\"" ; exit 255 ;;\nesac\n')
VCGENCMD_PI5 = _script(f'case "$1" in\n  get_throttled) echo "throttled=0x0" ;;\n'
                       f'  pmic_read_adc) cat "{RECORDED / "pi5_pmic_read_adc.txt"}" ;;\n  *) exit 255 ;;\nesac\n')
def _nvpmodel(mode: str) -> str:
    return _script(f'[ "$1" = "-q" ] && printf "NV Fan Mode:quiet\\nNV Power Mode: {mode}\\n0\\n"\n')


GETPROP = _script('case "$1" in\n  ro.product.model) echo "Pixel 7a" ;;\n  ro.product.manufacturer) echo "Google" ;;\n'
                  '  *) echo "" ;;\nesac\n')
TERMUX_BATTERY = _script(f'cat "{RECORDED / "termux_battery_status.json"}"\n')

TREES: dict[str, tuple[dict[str, str], dict[str, str], dict[str, str]]] = {
    # name: (files, commands, extra environment)
    "jetson-nano-jp4": (JETSON_NANO_JP4, {"nvpmodel": _nvpmodel("5W")}, {}),
    "jetson-orin-nano-jp5": (JETSON_ORIN_NANO_JP5, {"nvpmodel": _nvpmodel("15W")}, {}),
    "jetson-agx-orin-jp6": (JETSON_AGX_ORIN_JP6, {"nvpmodel": _nvpmodel("MAXN")}, {}),
    "raspberry-pi-4": (RASPBERRY_PI_4, {"vcgencmd": VCGENCMD_PI4}, {}),
    "raspberry-pi-5": (RASPBERRY_PI_5, {"vcgencmd": VCGENCMD_PI5}, {}),
    "android-phone": (ANDROID_PHONE, {"getprop": GETPROP, "termux-battery-status": TERMUX_BATTERY},
                      {"PREFIX": TERMUX_PREFIX}),
    "android-termux-only": (ANDROID_TERMUX_ONLY, {"getprop": GETPROP, "termux-battery-status": TERMUX_BATTERY},
                            {"PREFIX": TERMUX_PREFIX}),
    "x86-laptop": (X86_LAPTOP, {}, {}),
    "container": (CONTAINER, {}, {}),
    "container-v1": (CONTAINER_V1, {}, {}),
}


def make_root(name: str, dest: Path) -> tuple[Path, dict[str, str]]:
    """Write tree `name` under dest/root and its commands under dest/bin; return (root, env)."""
    files, commands, env = TREES[name]
    root, bin_dir = dest / "root", dest / "bin"
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if content.endswith(("\n", "\x00")) else content + "\n")
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command, script in commands.items():
        (bin_dir / command).write_text(script)
        (bin_dir / command).chmod(0o755)
    # The one utility the scripts use, and nothing else of the real PATH.
    for tool in ("cat",):
        found = shutil.which(tool)
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    return root, {"PATH": str(bin_dir), **env}
