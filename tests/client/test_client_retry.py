"""The client's retries (edge_client.retry on urllib3's Retry) against a loopback server that answers from a script:
what is retried, after which waits (as logged), what is not, and giving up."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from edge_client.server_api import ServerAPI, ServerError, ServerUnreachable
from tests.helpers.fake_server import loopback_server
from hetlora.errors import UserError

OK = (200, {}, {"client_id": "c", "rank": 4})


def scripted_server(answers: list[tuple[int, dict, dict]]):
    """Answers every request with the next (status, headers, JSON body) of `answers` (the last one from then on);
    yields (url, requests seen)."""
    def respond(method, path, count):
        status, headers, body = answers[min(count, len(answers)) - 1]
        return status, {"Content-Type": "application/json"} | headers, json.dumps(body).encode()

    return loopback_server(respond)


def retries_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hetlora.client" and "retry" in r.getMessage()]


def test_server_errors_are_retried_with_a_doubling_backoff_for_every_method(caplog):
    with scripted_server([(503, {}, {}), (500, {}, {}), OK]) as (url, seen), \
            caplog.at_level(logging.WARNING, logger="hetlora.client"):
        assert ServerAPI(url).report_profile({"device": "x"})["rank"] == 4
    assert seen == [("POST", "/v1/profile")] * 3
    assert retries_logged(caplog) == ["POST /v1/profile failed (server error 503); retry 1 in 1 s",
                                      "POST /v1/profile failed (server error 500); retry 2 in 2 s"]


def test_the_backoff_is_capped_at_max_backoff(caplog):
    with scripted_server([(502, {}, {})] * 3 + [OK]) as (url, _), caplog.at_level(logging.WARNING):
        ServerAPI(url, max_backoff=1.0).report_profile({})
    assert [line.rsplit("; ", 1)[1] for line in retries_logged(caplog)] == ["retry 1 in 1 s", "retry 2 in 1 s",
                                                                            "retry 3 in 1 s"]


def test_a_rate_limit_is_waited_out_only_with_retry_after(caplog):
    with scripted_server([(429, {"Retry-After": "1"}, {}), OK]) as (url, seen), caplog.at_level(logging.WARNING):
        ServerAPI(url).report_profile({})
    assert len(seen) == 2 and retries_logged(caplog) == ["POST /v1/profile failed (rate limited); retry 1 in 1 s"]
    refusal = {"error": {"code": "rate_limited", "message": "slow down"}}
    with scripted_server([(429, {}, refusal), OK]) as (url, seen), pytest.raises(ServerError) as refused:
        ServerAPI(url).report_profile({})
    assert (len(seen), refused.value.status, refused.value.code, refused.value.exit_code) == (1, 429, "rate_limited", 3)


def test_a_client_error_is_not_retried():
    refusal = {"error": {"code": "bad_token", "message": "unknown token"}}
    with scripted_server([(401, {}, refusal), OK]) as (url, seen), pytest.raises(ServerError) as refused:
        ServerAPI(url, token="t").current_round()
    assert len(seen) == 1 and refused.value.exit_code == 2 and "unknown token" in str(refused.value)


def test_an_unreachable_server_gives_up_after_the_limit():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServerUnreachable) as gave_up:
        ServerAPI(f"http://127.0.0.1:{port}", give_up_after=0.5).run()
    message = str(gave_up.value)
    assert message.startswith(f"GET http://127.0.0.1:{port}/v1/run failed 1 times (NewConnectionError")
    assert message.endswith("Connection refused); giving up") and gave_up.value.exit_code == 3


def test_a_server_url_without_a_scheme_is_a_user_error():
    with pytest.raises(UserError, match="is not a usable URL .*write it as http"):
        ServerAPI("127.0.0.1:8080").run()


def test_the_client_command_prints_one_short_line_per_retry_and_one_when_it_gives_up(capsys, caplog, tmp_path):
    from hetlora.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "data.csv").write_text("text,label\nhello,a\n")
    assert main(["client", "--server", f"http://127.0.0.1:{port}", "--data", str(tmp_path / "data.csv"),
                 "--state-dir", str(tmp_path / "state"), "--give-up-after", "2"]) == 3
    logged = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert [name for name, _ in logged] == ["hetlora.client"]  # urllib3's own 'Retrying (...)' line is silenced
    assert logged[0][1].endswith("retry 1 in 1 s") and len(logged[0][1]) < 250
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("hetlora client: error: GET http") and error.endswith("; giving up")
