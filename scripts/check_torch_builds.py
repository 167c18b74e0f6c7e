"""Which torch build each documented install path gets, by pip's own resolver (dry runs, nothing installed).

Paths, as README.md (the Makefile) and docs/DEVICES.md section 1 write them:
  make-install  Linux x86_64: torch from the PyTorch CPU index, then '.[dev]' on top of it
  board         Linux aarch64 (Raspberry Pi, Jetson on CPU): torch from the CPU index, then '.[client]'
  pypi-client   '.[client]' straight from the default index, for contrast: the trap the two avoid
For each path: the torch version pip picks, the file it comes from, and every nvidia-*, cuda-* or triton
package it would install. A documented path passes when its torch is a CPU build (a '+cpu' version, or
any torch without CUDA packages) and nothing CUDA comes with it.

Step two is resolved with step one's torch wheel given by its URL: to the resolver that is what an
installed torch is (2.13.0+cpu satisfies torch==2.13.0), so the step-two packages are exactly what
the project install adds. Needs PyPI and download.pytorch.org, or a pip configuration pointing at
mirrors; with --isolated pip ignores the configuration (a fresh machine's view). An unreachable index
leaves a path "unresolved" with pip's last message, never "pass".

    python scripts/check_torch_builds.py [--isolated] [--json]

Exit status 0 when every documented path passes, 1 otherwise. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import platform
import subprocess
import sys
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_PACKAGE = re.compile(r"^(nvidia-|cuda-|triton$)")
PATHS = {  # name: (machine, project extra, torch from the CPU index first, documented)
    "make-install": ("x86_64", "dev", True, True),
    "board": ("aarch64", "client", True, True),
    "pypi-client": ("x86_64", "client", False, False),
}


def torch_pin() -> str:
    """The exact torch requirement of pyproject.toml (one pin for the whole project)."""
    match = re.search(r'"(torch==[^"]+)"', (PROJECT / "pyproject.toml").read_text())
    if match is None:
        raise SystemExit("check_torch_builds: no torch==... pin in pyproject.toml")
    return match.group(1)


def platform_args(machine: str) -> list[str]:
    """pip options resolving for CPython 3.11 on manylinux `machine` (pip does not widen a tag by itself).

    None on this machine's own architecture: a foreign platform needs --only-binary=:all:, which rules
    out the few dev dependencies published as source only.
    """
    if machine == platform.machine():
        return []
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(28, 16, -1)] + [f"manylinux2014_{machine}"]
    return [arg for tag in tags for arg in ("--platform", tag)] + [
        "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none",
        "--only-binary=:all:"]


def dry_run(requirements: list[str], options: list[str], isolated: bool) -> list[dict]:
    """pip's install report entries for `requirements`; RuntimeError with pip's last message if it fails."""
    cmd = [sys.executable, "-m", "pip", *(["--isolated"] if isolated else []), "install", "--dry-run",
           "--ignore-installed", "--quiet", "--retries", "1", "--timeout", "30", "--report", "-", *options,
           *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        raise RuntimeError((errors or proc.stderr.strip().splitlines() or ["pip failed"])[0])
    return json.loads(proc.stdout)["install"]


def summarize(entries: list[dict]) -> dict:
    """torch's version and file, and the CUDA packages among `entries` (pip report items)."""
    torch = next((e for e in entries if e["metadata"]["name"].lower() == "torch"), None)
    cuda = sorted(e["metadata"]["name"] for e in entries if CUDA_PACKAGE.match(e["metadata"]["name"].lower()))
    return {"torch": torch["metadata"]["version"] if torch else None,
            "torch_url": torch["download_info"]["url"] if torch else None, "cuda_packages": cuda}


def verdict(summary: dict) -> str:
    if summary["torch"] is None:
        return "fail: no torch resolved"
    return "fail: CUDA packages" if summary["cuda_packages"] else "pass"


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except OSError:
        return False


def check_path(name: str, isolated: bool) -> dict:
    machine, extra, cpu_index_first, documented = PATHS[name]
    options = platform_args(machine)
    try:
        entries: list[dict] = []
        torch_requirement = []
        if cpu_index_first:
            entries = dry_run([torch_pin()], options + ["--no-deps", "--index-url", CPU_INDEX], isolated)
            torch_requirement = [f"torch @ {summarize(entries)['torch_url']}"]
        entries += dry_run([f".[{extra}]", *torch_requirement], options, isolated)
    except RuntimeError as exc:
        return {"path": name, "machine": machine, "documented": documented, "result": f"unresolved: {exc}"}
    summary = summarize(entries)
    return {"path": name, "machine": machine, "documented": documented, **summary, "result": verdict(summary)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isolated", action="store_true", help="ignore pip's configuration and environment")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    results = [check_path(name, args.isolated) for name in PATHS]
    if not reachable(f"{CPU_INDEX}/torch/"):
        print(f"note: {CPU_INDEX} is unreachable from here; paths using it resolved from other configured "
              "sources or not at all", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    for r in results if not args.json else ():
        cuda = ", ".join(r.get("cuda_packages") or []) or "none"
        print(f"{r['path']:13} {r['machine']:8} torch {r.get('torch')}  CUDA packages: {cuda}  -> {r['result']}")
    return 0 if all(r["result"] == "pass" for r in results if r["documented"]) else 1


if __name__ == "__main__":
    sys.exit(main())
