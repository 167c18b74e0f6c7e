"""The device catalog (profiles/devices/*.json): real devices, their specifications and sources.

- `list_devices()` -> the catalog ids; `device(id)` -> the validated entry.
- `profile_for(id)` -> a "hetlora-profile" document for that device at its nominal state (idle,
  cool, on the charger), with identity.catalog_id set and compute.source "catalog" (estimated figures,
  not measurements): what `hetlora profile --as ID` and the policy use.
- `match_catalog_id(identity)` -> the id whose match strings occur in a measured identity's model string.
- `simulated_fleet(n, seed)` -> n reproducible profile documents drawn from the catalog, with varied
  battery, temperature and upload bandwidth, for the demo.
"""

from __future__ import annotations

import copy
import functools
import json
import random
from pathlib import Path

from hetlora.errors import UserError

DEVICES_DIR = Path(__file__).with_name("devices")
PLATFORMS = ("jetson", "raspberry-pi", "android", "linux-x86", "other")
# field path -> type check; every one must be present in an entry
REQUIRED = {
    "id": str, "name": str,
    "identity.platform": str, "identity.vendor": str, "identity.model": str, "identity.arch": str,
    "identity.match": list,
    "cpu.cores": int, "cpu.max_freq_mhz": (int, float),
    "memory.total_bytes": int, "memory.typical_available_bytes": int,
    "compute.peak_gflops": (int, float), "compute.sustained_gflops": (int, float),
    "power.typical_training_w": (int, float), "power.idle_w": (int, float),
    "battery.present": bool,
    "sources.cpu": str, "sources.memory": str, "sources.compute": str, "sources.power": str,
}


def validate_device(doc, source: str) -> dict:
    """Check one catalog entry; errors name the file, the field and what is expected."""
    def fail(msg: str):
        raise UserError(f"device catalog entry {source}: {msg}")

    if not isinstance(doc, dict) or doc.get("schema") != "hetlora-device" or doc.get("version") != 1:
        fail('expected a JSON object with "schema": "hetlora-device", "version": 1')
    for dotted, kind in REQUIRED.items():
        value = doc
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            fail(f"missing field {dotted}")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            fail(f"field {dotted} has the wrong type ({type(value).__name__}); see profiles/devices/raspberry-pi-4.json")
    if doc["identity"]["platform"] not in PLATFORMS:
        fail(f"identity.platform {doc['identity']['platform']!r} is not one of {list(PLATFORMS)}")
    if not doc["identity"]["match"] or not all(isinstance(m, str) and m for m in doc["identity"]["match"]):
        fail("identity.match must list non-empty model strings to recognise the device by")
    numbers = ("cpu.cores", "cpu.max_freq_mhz", "memory.total_bytes", "memory.typical_available_bytes",
               "compute.peak_gflops", "compute.sustained_gflops", "power.typical_training_w")
    for dotted in numbers:
        section, key = dotted.split(".")
        if doc[section][key] <= 0:
            fail(f"field {dotted} must be positive")
    if doc["memory"]["typical_available_bytes"] > doc["memory"]["total_bytes"]:
        fail("memory.typical_available_bytes exceeds memory.total_bytes")
    if doc["compute"]["sustained_gflops"] > doc["compute"]["peak_gflops"]:
        fail("compute.sustained_gflops exceeds compute.peak_gflops")
    return doc


@functools.lru_cache(maxsize=1)
def _catalog() -> dict[str, dict]:
    entries = {}
    for path in sorted(DEVICES_DIR.glob("*.json")):
        try:
            doc = validate_device(json.loads(path.read_text()), path.name)
        except json.JSONDecodeError as exc:
            raise UserError(f"device catalog entry {path.name} is not valid JSON: {exc}") from None
        if doc["id"] != path.stem:
            raise UserError(f"device catalog entry {path.name}: id {doc['id']!r} must equal the file name")
        entries[doc["id"]] = doc
    return entries


def list_devices() -> list[str]:
    return sorted(_catalog())


def device(catalog_id: str) -> dict:
    """A copy of the validated catalog entry."""
    try:
        return copy.deepcopy(_catalog()[catalog_id])
    except KeyError:
        raise UserError(f"unknown device {catalog_id!r}; the catalog has: {', '.join(list_devices())}") from None


def profile_for(catalog_id: str) -> dict:
    """A profile document for a catalog device at its nominal state: idle, cool, on the charger."""
    d = device(catalog_id)
    ident = d["identity"]
    available = d["memory"]["typical_available_bytes"]
    has_battery = d["battery"]["present"]
    return {
        "schema": "hetlora-profile", "version": 1, "created": None, "quick": False,
        "identity": {"platform": ident["platform"], "model": ident["model"], "vendor": ident["vendor"],
                     "arch": ident["arch"], "os": None, "jetpack": ident.get("jetpack"), "catalog_id": d["id"]},
        "cpu": {"cores": d["cpu"]["cores"], "freq_mhz": None, "max_freq_mhz": float(d["cpu"]["max_freq_mhz"]),
                "throttled": False, "throttle_reasons": []},
        "memory": {"total_bytes": d["memory"]["total_bytes"], "available_bytes": available,
                   "cgroup_limit_bytes": None, "usable_bytes": available},
        "battery": {"present": has_battery, "percent": 100.0 if has_battery else None,
                    "plugged": True if has_battery else None, "charging": False if has_battery else None,
                    "power_w": None, "source": "none"},
        "power_sources": [],
        "thermal": {"zones": {}, "max_c": None},
        "compute": {"peak_gflops": float(d["compute"]["peak_gflops"]),
                    "sustained_gflops": float(d["compute"]["sustained_gflops"]), "duration_s": None,
                    "lora_step_s": None, "source": "catalog"},
        "network": {"upload_mbps": None, "download_mbps": None},
    }


def match_catalog_id(identity: dict) -> str | None:
    """The catalog id whose longest match string occurs (case-insensitively) in identity.model."""
    model = (identity or {}).get("model") or ""
    best, best_len = None, 0
    for cid, d in _catalog().items():
        for pattern in d["identity"]["match"]:
            if pattern.lower() in model.lower() and len(pattern) > best_len:
                best, best_len = cid, len(pattern)
    return best


# Conditions a simulated device may be in this round: (battery percent, plugged, max °C, upload Mbit/s).
_CONDITIONS = [(100.0, True, 45.0, 20.0), (85.0, False, 50.0, 10.0), (20.0, False, 55.0, 5.0),
               (60.0, True, 80.0, 8.0), (90.0, True, 40.0, 1.5), (70.0, False, 48.0, None)]


def simulated_fleet(n: int, seed: int = 0) -> list[dict]:
    """n catalog profiles, reproducible from `seed`: every device appears before any repeats, each in
    a drawn condition (battery off the charger, heat, slow upload) so the fleet spans several tiers."""
    if n < 1:
        raise UserError(f"a fleet needs at least one device, got n={n}")
    rng = random.Random(seed)
    ids = list_devices()
    fleet = []
    while len(fleet) < n:
        order = ids[:]
        rng.shuffle(order)
        for cid in order[: n - len(fleet)]:
            profile = profile_for(cid)
            percent, plugged, max_c, upload = rng.choice(_CONDITIONS)
            if profile["battery"]["present"]:
                profile["battery"].update(percent=percent, plugged=plugged, charging=plugged and percent < 100)
            profile["thermal"] = {"zones": {"cpu": max_c}, "max_c": max_c}
            profile["network"]["upload_mbps"] = upload
            profile["identity"]["fleet_index"] = len(fleet)
            fleet.append(profile)
    return fleet
