"""Training seconds and the estimated training energy: what a client reports with every upload (`--watts`, else its
catalog device's figure, else unknown), what the server checks and records in its history, and the one-line error
of a bad `--watts`. Real server on loopback, real `hetlora client` processes, the tiny BERT."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from hetlora.protocol.energy import Power, energy_of
from hetlora.protocol.wire import WireFormatError, encode, parse_meta, read_header
from profiles.catalog import device, profile_for
from simulation.fleet import start_client
from tests.helpers.fleet import run_to_end, serve_args, start_server, write_data
from tests.helpers.server import (error_code, make_config, make_update, post_update, register,
                                  running_server, snapshot, upload_meta)

PI5 = "raspberry-pi-5"


def test_a_report_is_checked_and_its_joules_are_watts_times_seconds():
    report = Power(8.5, f"catalog:{PI5}").report(2.0)
    assert report == {"seconds": 2.0, "watts": 8.5, "watts_source": f"catalog:{PI5}", "joules": 17.0,
                      "estimated": True}
    assert energy_of({"energy": report}) == report
    assert energy_of({"energy": Power().report(3.0)})["joules"] is None
    assert energy_of({}) is None  # a client that sends no report (an older one)


def bad_reports() -> list[tuple[str, object, str]]:
    good = Power(8.5, f"catalog:{PI5}").report(2.0)
    return [
        ("NaN seconds", good | {"seconds": math.nan}, "energy.seconds"),
        ("negative seconds", good | {"seconds": -1.0, "joules": -8.5}, "energy.seconds"),
        ("seconds as a string", good | {"seconds": "2.0"}, "energy.seconds"),
        ("a year of seconds", good | {"seconds": 3.2e7, "joules": 8.5 * 3.2e7}, "energy.seconds"),
        ("huge watts", good | {"watts": 1e300, "joules": 2e300}, "energy.watts"),
        ("infinite joules", good | {"joules": math.inf}, "energy.joules"),
        ("joules that are not watts x seconds", good | {"joules": 1.0}, "not watts x seconds"),
        ("watts with an unknown source", good | {"watts_source": "unknown"}, "must be null"),
        ("a made-up source", good | {"watts_source": "my guess"}, "energy.watts_source"),
        ("not an estimate", good | {"estimated": False}, "estimated true"),
        ("an extra key", good | {"measured_joules": 3.0}, "exactly"),
        ("not an object", "17 J", "exactly"),
    ]


@pytest.mark.parametrize("label, report, message", bad_reports())
def test_a_malformed_report_is_refused_naming_the_field(label, report, message):
    with pytest.raises(WireFormatError) as err:
        energy_of({"energy": report})
    assert err.value.code == "bad_metadata" and message in str(err.value), label


def test_the_server_refuses_malformed_reports_stores_nothing_and_records_the_good_ones(spec, tmp_path):
    state = tmp_path / "state"
    with running_server(make_config(spec, min_clients=2), state) as http:
        reporting, silent = register(http, 2), register(http, 2)
        meta = upload_meta(reporting, 1, 2, 10)
        before = snapshot(http, state)
        for label, report, message in bad_reports():
            reply = post_update(http, reporting, 1, encode(make_update(spec, 2, meta | {"energy": report}, seed=1)))
            assert (reply.status_code, error_code(reply)) == (400, "bad_metadata"), label
            assert message in reply.json()["error"]["message"], label
        assert snapshot(http, state) == before  # nothing stored, nothing changed
        good = Power(8.5, f"catalog:{PI5}").report(2.0)
        assert post_update(http, reporting, 1, encode(make_update(spec, 2, meta | {"energy": good}, seed=1))
                           ).status_code == 201
        assert post_update(http, silent, 1, encode(make_update(spec, 2, upload_meta(silent, 1, 2, 10), seed=2))
                           ).status_code == 201
        energy = http.get("/v1/status").json()["history"][0]["energy"]
    assert energy == {"estimated": True, "clients": {reporting["client_id"]: good, silent["client_id"]: None},
                      "joules": 17.0, "seconds": 2.0, "unknown": [silent["client_id"]]}


@pytest.fixture(scope="module")
def reporting_run(tiny_bert_dir, labels_file, tmp_path_factory):
    """Round 0 (head statistics), one head round and one LoRA round with three clients: one with --watts, one
    presenting a catalog device, one whose device no catalog entry matches."""
    tmp = tmp_path_factory.mktemp("energy-run")
    unknown = profile_for(PI5)
    unknown["identity"] |= {"catalog_id": None, "model": "a board nobody catalogued"}
    (tmp / "unknown.json").write_text(json.dumps(unknown))
    who = {"watts": ["--watts", "5.5", "--profile-as", "jetson-orin-nano"], "catalog": ["--profile-as", PI5],
           "unknown": ["--profile-file", str(tmp / "unknown.json")]}
    server, url = start_server(serve_args(tiny_bert_dir, labels_file, "hetlora", rounds=1, head_rounds=1),
                               tmp / "server")
    status = run_to_end(server, url, lambda: [
        start_client(url, write_data(tmp / f"{name}.csv", 12, i), tmp / name,
                     ["--model", str(tiny_bert_dir), "--name", name, "--poll-seconds", "0.2", *extra])
        for i, (name, extra) in enumerate(who.items())])
    return tmp, status


def stored_energy(server_dir, round_number: int) -> dict:
    """name -> the energy report in each client's stored upload of a round, as the client sent it."""
    reports = {}
    for path in sorted((server_dir / "blobs" / "uploads" / f"r{round_number:04d}").glob("*.safetensors")):
        meta = parse_meta(read_header(path.read_bytes())["__metadata__"])  # statistics (round 0) or an adapter
        reports[meta["client_id"]] = meta["energy"]
    return reports


@pytest.mark.integration
def test_every_upload_carries_its_training_seconds_and_energy_estimate(reporting_run):
    tmp, status = reporting_run
    names = {c["client_id"]: c["name"] for c in status["clients"]}
    assert [h["stage"] for h in status["history"]] == ["head-statistics", "head-fit", "lora"]
    expected = {"watts": (5.5, "--watts"),  # --watts wins over the profile's catalog device
                "catalog": (device(PI5)["power"]["typical_training_w"], f"catalog:{PI5}"),
                "unknown": (None, "unknown")}
    for entry in status["history"]:
        sent = stored_energy(tmp / "server", entry["round"])
        assert entry["energy"]["clients"] == sent  # the history records what each client sent
        for client, report in sent.items():
            watts, source = expected[names[client]]
            assert report["seconds"] > 0 and report["estimated"] is True, (entry["round"], report)
            assert (report["watts"], report["watts_source"]) == (watts, source)
            if watts is None:
                assert report["joules"] is None
            else:
                assert report["joules"] == pytest.approx(watts * report["seconds"], rel=1e-9)
        known = [r["joules"] for r in sent.values() if r["joules"] is not None]
        assert entry["energy"]["joules"] == pytest.approx(sum(known))
        assert [names[c] for c in entry["energy"]["unknown"]] == ["unknown"]
    assert "training energy unknown" in (tmp / "unknown.log").read_text()


@pytest.mark.parametrize("value", ["nan", "-3", "0", "1e9", "lots"])
def test_a_bad_watts_flag_is_one_line_and_exit_status_2(value, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hetlora.cli", "client", "--server", "http://127.0.0.1:9",
                           "--data", "x.csv", "--state-dir", str(tmp_path / "c"), "--watts", value],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("hetlora client: error: argument --watts: "), proc.stderr


def test_a_state_dir_from_before_energy_reports_gains_the_column_and_shows_them_unknown(tmp_path):
    import sqlite3

    from server_stub.store import SCHEMA, Store

    old = SCHEMA.replace("    energy TEXT,\n", "")
    assert old != SCHEMA
    with sqlite3.connect(tmp_path / "state.sqlite") as db:
        db.executescript(old)
        db.execute("INSERT INTO uploads VALUES (1, 'c-1', 'ab', 'uploads/x', 2, 2, 10, 100, 0.0)")
    store = Store(tmp_path)
    assert store.select("SELECT client_id, energy FROM uploads") == [{"client_id": "c-1", "energy": None}]
    store.close()
