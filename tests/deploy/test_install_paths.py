"""The documented install paths take a CPU torch: the Makefile's commands and scripts/check_torch_builds.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT / "scripts"))
import check_torch_builds as check  # noqa: E402


def report_entry(name: str, version: str, url: str = "https://example.invalid/x.whl") -> dict:
    """One item of pip's --report 'install' list, with the fields the check reads."""
    return {"metadata": {"name": name, "version": version}, "download_info": {"url": url}}


def make_install_commands(tmp_path: Path) -> list[str]:
    make = shutil.which("make")
    assert make, "make is needed to read the Makefile's commands"
    venv = tmp_path / "venv"
    result = subprocess.run([make, "-n", "-C", str(PROJECT), "install", f"VENV={venv}"],
                            capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def test_makefile_installs_the_pinned_torch_from_the_cpu_index_before_the_project(tmp_path):
    lines = make_install_commands(tmp_path)
    pin = re.search(r'"(torch==[^"]+)"', (PROJECT / "pyproject.toml").read_text()).group(1)
    torch_line = next(i for i, line in enumerate(lines) if f"'{pin}'" in line)
    project_line = next(i for i, line in enumerate(lines) if "-e '.[dev]'" in line)
    assert torch_line < project_line
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch_line]
    assert "--no-deps" in lines[torch_line]


def test_makefile_torch_index_can_be_pointed_at_a_mirror(tmp_path):
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "-n", "-C", str(PROJECT), "install", f"VENV={venv}",
                          "TORCH_INDEX=https://mirror.example/cpu"], capture_output=True, text=True, check=True).stdout
    assert "--index-url https://mirror.example/cpu" in out
    assert "download.pytorch.org" not in out


def test_cuda_packages_in_a_resolution_fail_the_path():
    entries = [report_entry("torch", "2.13.0", "https://files.example/torch-2.13.0-cp311-manylinux_2_28_x86_64.whl"),
               report_entry("nvidia-cublas", "13.1.0"), report_entry("triton", "3.6.0"),
               report_entry("cuda-toolkit", "13.0.2"), report_entry("filelock", "3.20.0"),
               report_entry("tritonclient", "2.0.0")]
    summary = check.summarize(entries)
    assert summary["torch"] == "2.13.0"
    assert summary["cuda_packages"] == ["cuda-toolkit", "nvidia-cublas", "triton"]
    assert check.verdict(summary) == "fail: CUDA packages"


def test_a_cpu_torch_without_cuda_packages_passes():
    url = "https://download.pytorch.org/whl/cpu/torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    summary = check.summarize([report_entry("torch", "2.13.0+cpu", url), report_entry("sympy", "1.14.0")])
    assert summary == {"torch": "2.13.0+cpu", "torch_url": url, "cuda_packages": []}
    assert check.verdict(summary) == "pass"
    assert check.verdict(check.summarize([report_entry("sympy", "1.14.0")])) == "fail: no torch resolved"


@pytest.mark.parametrize("machine", ["aarch64", "x86_64"])
def test_a_foreign_platform_is_resolved_for_every_manylinux_glibc_from_2_17(machine, monkeypatch):
    monkeypatch.setattr(check.platform, "machine", lambda: "riscv64")
    args = check.platform_args(machine)
    tags = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert f"manylinux_2_28_{machine}" in tags and f"manylinux_2_17_{machine}" in tags
    assert f"manylinux2014_{machine}" in tags and "--only-binary=:all:" in args
    monkeypatch.setattr(check.platform, "machine", lambda: machine)
    assert check.platform_args(machine) == []
