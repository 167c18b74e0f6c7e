"""Who the device is: model, vendor, architecture, OS, JetPack release and platform class.

Sources, in order: /proc/device-tree/model (Pi, Jetson), /etc/nv_tegra_release (Jetson),
`getprop ro.product.*` (Android), DMI /sys/devices/virtual/dmi/id (x86). Unknown -> None.
On a Jetson, `nvpmodel -q` gives the power mode (e.g. 5W, 15W, MAXN), which caps its clocks.
"""

from __future__ import annotations

import platform
import re

from edge_client.device.host import Host

PLATFORMS = ("jetson", "raspberry-pi", "android", "linux-x86", "other")
X86_ARCHES = {"x86_64", "amd64", "i386", "i686"}
_TEGRA_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")


def jetpack_release(text: str | None) -> str | None:
    """L4T release from /etc/nv_tegra_release: '# R35 (release), REVISION: 4.1, ...' -> 'R35.4.1'."""
    match = _TEGRA_RELEASE.search(text or "")
    return f"R{match.group(1)}.{match.group(2)}" if match else None


def is_android(host: Host) -> bool:
    """Termux (PREFIX under com.termux) or an Android system partition."""
    return "com.termux" in host.env.get("PREFIX", "") or host.exists("/system/build.prop")


def nvpmodel_mode(host: Host) -> str | None:
    """The Jetson power mode from `nvpmodel -q` ('NV Power Mode: MAXN' -> 'MAXN'); it caps the clocks."""
    match = re.search(r"NV Power Mode:\s*(\S+)", host.run(["nvpmodel", "-q"]) or "")
    return match.group(1) if match else None


def getprop(host: Host, name: str) -> str | None:
    """An Android system property; Termux's PATH may lack /system/bin, so that is tried too."""
    for exe in ("getprop", str(host.path("/system/bin/getprop"))):
        value = (host.run([exe, name]) or "").strip()
        if value:
            return value
    return None


def _arch(host: Host) -> str | None:
    arch = host.read("/proc/sys/kernel/arch")
    if arch:
        return arch
    return (platform.machine() or None) if host.live else None


def _os(host: Host) -> str | None:
    ostype, release = host.read("/proc/sys/kernel/ostype"), host.read("/proc/sys/kernel/osrelease")
    if not ostype:
        return None
    version = re.match(r"(\d+\.\d+)", release or "")
    return f"{ostype} {version.group(1)}" if version else ostype


def _vendor_from_model(model: str | None) -> str | None:
    """Vendors implied by a device-tree model string."""
    if not model:
        return None
    if model.startswith("Raspberry Pi"):
        return "Raspberry Pi Foundation"
    if model.startswith("NVIDIA"):
        return "NVIDIA"
    return None


def _dmi(host: Host) -> tuple[str | None, str | None]:
    """(model, vendor) from DMI; Lenovo keeps the model name in product_version, a code in product_name."""
    dmi = "/sys/devices/virtual/dmi/id/"
    vendor = host.read(dmi + "sys_vendor") or None
    model = host.read(dmi + "product_name") or None
    if vendor == "LENOVO":
        model = host.read(dmi + "product_version") or model
    return model, vendor


def platform_class(*, android: bool, model: str | None, jetpack: str | None, arch: str | None) -> str:
    if jetpack or (model and "Jetson" in model):
        return "jetson"
    if model and model.startswith("Raspberry Pi"):
        return "raspberry-pi"
    if android:
        return "android"
    if arch in X86_ARCHES:
        return "linux-x86"
    return "other"


def read_identity(host: Host) -> dict:
    """The profile's "identity" section (catalog_id is filled in by the profile collector)."""
    android = is_android(host)
    model = host.read("/proc/device-tree/model") or None
    vendor = _vendor_from_model(model)
    if android:
        model = getprop(host, "ro.product.model") or model
        vendor = getprop(host, "ro.product.manufacturer") or vendor
    if not model:
        model, vendor = _dmi(host)
    jetpack = jetpack_release(host.read("/etc/nv_tegra_release"))
    arch = _arch(host)
    platform_name = platform_class(android=android, model=model, jetpack=jetpack, arch=arch)
    return {
        "platform": platform_name,
        "model": model,
        "vendor": vendor,
        "arch": arch,
        "os": _os(host),
        "jetpack": jetpack,
        "power_mode": nvpmodel_mode(host) if platform_name == "jetson" else None,
        "catalog_id": None,
    }
