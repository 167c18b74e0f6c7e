"""User-facing paths no other test walks: a client that outlasts a server outage, `--allow-names` files, the
clear-text warnings of both commands, and `404 no_such_version` for a global that does not exist."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest

from hetlora.cli import build_parser, main
from simulation.fleet import start_client
from tests.helpers.fake_server import fake_server, run_client
from tests.helpers.server import (LABELS, error_code, make_config, register, running_server, sigkill,
                                  start_cli_server)

NAMES = "# the devices of this site\npi-kitchen\n\n  jetson-lab  \n#retired-phone\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_a_client_retries_through_a_server_outage_and_finishes(spec, tiny_bert_dir, tmp_path):
    """The client starts while nothing listens at the URL, logs its retries, and finishes the run once the
    server comes up at that address."""
    from server_stub.background import serve_in_background

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"my {LABELS[i % 3]} question {i},{LABELS[i % 3]}\n" for i in range(12)))
    client = start_client(url, data, tmp_path / "client", ["--model", str(tiny_bert_dir), "--poll-seconds", "0.2"])
    try:
        log = tmp_path / "client.log"
        deadline = time.monotonic() + 120
        while "retry 1" not in (log.read_text() if log.exists() else ""):
            assert client.alive() and time.monotonic() < deadline, client.tail()
            time.sleep(0.2)
        config = make_config(spec, min_clients=1, rounds=1)
        with serve_in_background(config, tmp_path / "state", port=port) as served:
            assert served == url
            assert client.wait(timeout=240) == 0, client.tail()
            status = httpx.get(url + "/v1/status").json()
        assert status["finished"] and len(status["history"]) == 1 and len(status["clients"]) == 1
        assert "Traceback" not in log.read_text()
    finally:
        client.stop()


def test_allow_names_file_lets_only_its_names_register(spec, tmp_path):
    """One name per line; blank lines, '#' comments and surrounding spaces are not names."""
    from server_stub.background import serve_in_background
    from server_stub.cli import build_enrollment

    names = tmp_path / "names.txt"
    names.write_text(NAMES)
    args = build_parser().parse_args(["serve", "--model", "m", "--labels", "l", "--allow-names", str(names)])
    gate = build_enrollment(args)
    assert gate.allowed_names == {"pi-kitchen", "jetson-lab"}
    with serve_in_background(make_config(spec), tmp_path / "state", enrollment=gate) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        register(http, 4, name="jetson-lab")
        for name in ("retired-phone", "#retired-phone", "", None):
            reply = http.post("/v1/register", json={"profile": {}, "requested_rank": 4, "n_samples": 1, "name": name})
            assert (reply.status_code, error_code(reply)) == (403, "name_not_allowed"), name


def test_a_missing_allow_names_file_is_one_error_line(tiny_bert_dir, labels_file, tmp_path, capsys):
    code = main(["serve", "--model", str(tiny_bert_dir), "--labels", str(labels_file), "--state-dir",
                 str(tmp_path / "state"), "--allow-names", str(tmp_path / "nowhere.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("hetlora serve: error: cannot read the allowlist"), err
    assert "Traceback" not in "\n".join(err)


def test_the_client_warns_when_its_server_url_is_clear_text_beyond_loopback(capsys, caplog, tmp_path):
    page = (200, "text/html", b"<html>not a hetlora server</html>")
    for folder in ("loopback", "any"):
        (tmp_path / folder).mkdir()
    with fake_server({("GET", "/v1/run"): page}) as (url, _):
        port = url.rsplit(":", 1)[1]
        with caplog.at_level(logging.WARNING, logger="hetlora.client"):
            code, _ = run_client(capsys, url, tmp_path / "loopback")
            assert code == 3 and "clear text" not in caplog.text
            # 0.0.0.0 reaches this host too, but is no loopback address
            code, _ = run_client(capsys, f"http://0.0.0.0:{port}", tmp_path / "any")
    assert code == 3 and f"plain HTTP to http://0.0.0.0:{port}: the token and updates cross the network in clear " \
        "text" in caplog.text


@pytest.mark.integration
def test_the_server_warns_when_it_serves_clear_text_beyond_loopback(tiny_bert_dir, labels_file, tmp_path):
    """`hetlora serve --host 0.0.0.0` without a certificate says that tokens and updates cross in clear text."""
    log = tmp_path / "serve.log"
    proc, url = start_cli_server(tiny_bert_dir, labels_file, tmp_path / "state", extra=["--host", "0.0.0.0"],
                                 stderr=log)
    try:
        assert url.startswith("http://0.0.0.0:")
        deadline = time.monotonic() + 30
        while "clear text" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sigkill(proc)
    assert "plain HTTP on 0.0.0.0: bearer tokens and updates cross the network in clear text" in log.read_text()


def test_a_global_version_that_does_not_exist_is_404_no_such_version(spec, tmp_path):
    with running_server(make_config(spec, head_init="ncm"), tmp_path / "head") as http:  # round 0 still open
        reply = http.get("/v1/global")
        assert (reply.status_code, error_code(reply)) == (404, "no_such_version")
        assert "round 0 (head statistics) has not finished" in reply.json()["error"]["message"]
    with running_server(make_config(spec), tmp_path / "state") as http:
        assert http.get("/v1/global", params={"version": 0}).status_code == 200
        reply = http.get("/v1/global", params={"version": 7})
        assert (reply.status_code, error_code(reply)) == (404, "no_such_version")
        assert reply.json()["error"]["message"] == "global version 7 does not exist; the latest is 0"
