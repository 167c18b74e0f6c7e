"""deploy/: the systemd unit (checked by systemd-analyze itself) and the client requirements helper."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
UNIT = PROJECT / "deploy" / "systemd" / "hetlora-client.service"
CONFIG_EXAMPLE = PROJECT / "deploy" / "systemd" / "client.toml"
ENV_EXAMPLE = PROJECT / "deploy" / "systemd" / "client.env"
HELPER = PROJECT / "deploy" / "client_requirements.py"
EXEC = "/opt/hetlora/venv/bin/hetlora"

sys.path.insert(0, str(HELPER.parent))
from client_requirements import select  # noqa: E402


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; systemd allows repeated keys, so no dict."""
    entries, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_entries(UNIT.read_text()) if s == section and k == key]


@pytest.mark.parametrize("section, key, expected", [
    ("Unit", "After", "network-online.target"),
    ("Unit", "Wants", "network-online.target"),
    ("Service", "Restart", "always"),
    ("Service", "User", "hetlora"),
    ("Service", "StateDirectory", "hetlora"),
    ("Service", "WorkingDirectory", "/var/lib/hetlora"),
    ("Service", "Environment", "HF_HUB_OFFLINE=1"),
    ("Install", "WantedBy", "multi-user.target"),
])
def test_unit_has_the_required_settings(section, key, expected):
    assert expected in unit_values(section, key)


def test_unit_restarts_after_a_pause_at_lower_priority_and_keeps_state_in_its_state_directory():
    assert int(unit_values("Service", "RestartSec")[0]) > 0
    assert int(unit_values("Service", "Nice")[0]) > 0
    exec_start = unit_values("Service", "ExecStart")[0].split()
    assert exec_start[:2] == [EXEC, "client"]
    state_dir = dict(v.split("=", 1) for v in unit_values("Service", "Environment"))["HETLORA_STATE_DIR"]
    assert state_dir.startswith("/var/lib/" + unit_values("Service", "StateDirectory")[0] + "/")
    # Exit 0 (training finished) and 2 (configuration error) must not loop.
    assert set(unit_values("Service", "RestartPreventExitStatus")[0].split()) == {"0", "2"}


def test_the_unit_reads_the_example_config_file():
    exec_start = unit_values("Service", "ExecStart")[0].split()
    assert exec_start[exec_start.index("--config") + 1] == "/etc/hetlora/" + CONFIG_EXAMPLE.name
    assert "$" not in " ".join(exec_start)  # no environment variables left to define
    assert unit_values("Service", "EnvironmentFile") == ["-/etc/hetlora/" + ENV_EXAMPLE.name]  # optional


def test_the_environment_example_names_client_variables_only():
    from hetlora.env_flags import ENV_FLAGS, variable

    names = re.findall(r"^# (HETLORA_[A-Z_]+)=", ENV_EXAMPLE.read_text(), re.M)
    assert names and set(names) <= {variable(f) for f in ENV_FLAGS["client"]}
    assert "HETLORA_STATE_DIR" in {v.split("=", 1)[0] for v in unit_values("Service", "Environment")}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system").is_dir(),
                    reason="needs systemd-analyze and the system's units in /usr/lib/systemd/system")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    """Offline verification in a scratch root holding the system's own units and the client executable."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/hetlora").mkdir(parents=True)
    shutil.copy(CONFIG_EXAMPLE, root / "etc/hetlora" / CONFIG_EXAMPLE.name)
    executable = root / EXEC.lstrip("/")
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)

    def verify(unit_text: str) -> subprocess.CompletedProcess:
        (root / "etc/systemd/system" / UNIT.name).write_text(unit_text)
        return subprocess.run(["systemd-analyze", "verify", f"--root={root}", UNIT.name],
                              capture_output=True, text=True, timeout=60)

    result = verify(UNIT.read_text())
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    # The check is real: a misspelled key is reported.
    broken = verify(UNIT.read_text().replace("RestartSec=", "RestartSecs="))
    assert "Unknown key 'RestartSecs'" in broken.stderr


METADATA = [
    "numpy<3,>=1.26",
    "safetensors==0.8.0",
    'torch==2.13.0; extra == "client"',
    'transformers==5.23.0; extra == "client"',
    'fastapi==0.165.0; extra == "server"',
    'onnxruntime-training-cpu==1.19.2; (platform_machine == "x86_64") and extra == "export"',
    "psutil==7.2.2; extra == 'client'",
]


def test_select_takes_core_and_client_requirements_minus_the_excluded():
    assert select(METADATA, "client", {"Torch"}) == ["numpy<3,>=1.26", "safetensors==0.8.0",
                                                     "transformers==5.23.0", "psutil==7.2.2"]
    assert "torch==2.13.0" in select(METADATA, "client", set())


def test_select_evaluates_python_version_markers():
    old, new = 'tomli==2.5.0; python_version < "3.11"', 'tomli-w==1.2.0; python_version >= "3.11"'
    below = sys.version_info[:2] < (3, 11)
    assert select([old, new], "client", set()) == (["tomli==2.5.0"] if below else ["tomli-w==1.2.0"])


def test_select_refuses_a_marker_it_cannot_evaluate_on_a_wanted_requirement():
    with pytest.raises(ValueError, match="cannot evaluate marker"):
        select([*METADATA, 'tqdm==4.70.1; sys_platform == "linux" and extra == "client"'], "client", set())


def test_helper_matches_the_client_extra_of_pyproject():
    """Against the installed metadata; pyproject.toml is the independent reference."""
    from packaging.requirements import Requirement

    result = subprocess.run([sys.executable, str(HELPER), "--without", "torch"], capture_output=True, text=True)
    if "is not installed" in result.stderr:
        pytest.skip("hetlora-edge is not installed in this Python")
    assert result.returncode == 0, result.stderr
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    expected = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["client"]]
    expected = [(r.name, r.specifier) for r in expected if r.name != "torch" and (r.marker is None or
                r.marker.evaluate({"extra": "client"}))]
    assert [(r.name, r.specifier) for r in map(Requirement, result.stdout.splitlines())] == expected


def test_the_server_extra_pins_the_model_stack_as_the_client_extra_does():
    """torch, transformers and gguf (the model layer) are listed in both extras: one version of each."""
    extras = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    stack = {"torch", "transformers", "gguf"}
    pins = {name: [r for r in extras[name] if r.split("==")[0] in stack] for name in ("client", "server")}
    assert len(pins["server"]) == len(stack) and sorted(pins["server"]) == sorted(pins["client"])
