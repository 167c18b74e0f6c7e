"""The client against bad server answers and bad local folders: one error line and a documented exit status,
never a traceback; an update the server refused as invalid is moved aside instead of re-sent forever."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import encode
from hetlora.cli import main
from tests.helpers.fake_server import as_json, fake_server, open_round_routes, run_client, write_data
from tests.helpers.server import LABELS, make_config, make_update, register, running_server, upload_meta


def test_html_with_200_is_one_error_line_and_exit_3(capsys, tmp_path):
    page = (200, "text/html", b"<html><body>Welcome to nginx!</body></html>")
    with fake_server({("GET", "/v1/run"): page, ("POST", "/v1/register"): page}) as (url, _):
        code, line = run_client(capsys, url, tmp_path)
    assert code == 3, line
    assert line.startswith("hetlora client: error: run config: the server answered 200 with text/html")
    assert "Welcome to nginx" in line


def test_empty_run_config_is_one_error_line_and_exit_3(capsys, tmp_path):
    with fake_server({("GET", "/v1/run"): as_json({})}) as (url, _):
        code, line = run_client(capsys, url, tmp_path)
    assert code == 3 and "no valid 'task'" in line


def test_a_malformed_plan_is_one_error_line(capsys, tmp_path, spec, run_config, tiny_bert_dir):
    update = make_update(spec, 2, {"round": 1}, seed=0)
    with fake_server(open_round_routes(run_config, encode(update), plan={"round": 1, "rank": "two"})) as (url, _):
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir)
    assert code == 3, line
    assert line == ("hetlora client: error: round 1: the server's plan is not valid: plan field 'rank' must be an "
                    "integer, got two")


def test_adapter_of_the_wrong_shape_is_one_error_line(capsys, tmp_path, spec, run_config, tiny_bert_dir):
    wrong = make_update(spec, 2, {"round": 1}, seed=0)
    name = next(iter(wrong.lora))
    a, b = wrong.lora[name]
    wrong.lora[name] = (a[:, :-3], b)
    with fake_server(open_round_routes(run_config, encode(wrong))) as (url, _):
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir)
    assert code == 3, line
    assert "the server's adapter does not fit this run" in line and name in line


def test_model_with_another_label_count_is_a_clear_error_before_registering(capsys, tmp_path, run_config,
                                                                             five_label_model, spec):
    with fake_server(open_round_routes(run_config, b"")) as (url, seen):
        code, line = run_client(capsys, url, tmp_path, five_label_model)
    assert code == 2 and "classification head for 5 labels, but this run has 3 labels" in line
    assert ("POST", "/v1/register") not in seen  # the client registers only once its model has loaded

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(list(LABELS)))
    adapter = tmp_path / "global.safetensors"
    adapter.write_bytes(encode(make_update(spec, 2, {}, seed=0)))
    test = write_data(tmp_path / "test.csv", 6)
    argv = ["evaluate", "--model", str(five_label_model), "--adapter", str(adapter), "--test", str(test), "--labels",
            str(labels)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "classification head for 5 labels" in err.strip().splitlines()[-1]


def test_update_refused_as_invalid_is_moved_aside_not_resent(spec, tmp_path):
    from edge_client.client import ClientOptions, EdgeClient
    from edge_client.client_state import ClientState, StateDir

    with running_server(make_config(spec, min_clients=2), tmp_path / "server") as http:
        me, _ = register(http, 2), register(http, 4)
        url = str(http.base_url).rstrip("/")
        state = StateDir(tmp_path / "client")
        state.save(ClientState(server=url, client_id=me["client_id"], token=me["token"], rank=2, run=me["run"]))
        bad = make_update(spec, 2, upload_meta(me, 1, 2, 10), seed=0)
        bad.lora[next(iter(bad.lora))][0][0, 0] = np.nan
        body = encode(bad)
        state.save_pending(body)

        client = EdgeClient(ClientOptions(server=url, data="unused", state_dir=str(state.path)), lambda: {})
        plan = ClientPlan(round=1, rank=2, mode="hetlora", training=TrainingSettings())
        assert client._round({"round": 1, "plan": plan.to_json()}) is False
        kept = state.path / "rejected" / "round-0001-not_finite.safetensors"
        assert kept.read_bytes() == body
        assert state.pending(1) is None
        assert StateDir(state.path).load(url).last_uploaded_round == 1  # the loop moves on to later rounds
        assert http.get("/v1/status").json()["round"]["uploads"] == []


@pytest.mark.slow
def test_profile_step_trains_a_model_folder_with_its_own_head(capsys, five_label_model):
    assert main(["profile", "--step", "--model", str(five_label_model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compute"]["lora_step_s"] > 0


def test_evaluate_without_model_on_another_base_models_adapter_is_one_line(capsys, tmp_path, spec):
    adapter = tmp_path / "global.safetensors"
    adapter.write_bytes(encode(make_update(spec, 2, {"labels": list(LABELS), "spec_fingerprint": spec.fingerprint},
                                           seed=0)))
    assert main(["evaluate", "--adapter", str(adapter), "--test", str(write_data(tmp_path / "test.csv", 6))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "does not fit the base model" in err[-1] and err[-1].endswith("pass --model with the folder of the base "
                                                                         "model the adapter was trained on")


def stale_state(tmp_path, url: str, run: dict):
    """A client state dir of a run the server at `url` never saw: an unknown token, an upload of round 3 pending."""
    from edge_client.client_state import ClientState, StateDir

    state = StateDir(tmp_path / "state")
    state.save(ClientState(server=url, client_id="c-gone", token="forgotten", rank=2, run=run, last_uploaded_round=2))
    state.save_pending(b"an update of the old run")
    return state


@pytest.mark.slow
def test_a_stale_state_registers_again_in_a_new_run_of_the_same_model(capsys, spec, tmp_path, tiny_bert_dir):
    config = make_config(spec, min_clients=1, rounds=1, training=TrainingSettings(steps=1, batch_size=2, seq_len=8))
    with running_server(config, tmp_path / "server") as http:
        url = str(http.base_url).rstrip("/")
        state = stale_state(tmp_path, url, config.run_config())
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir)
        status = http.get("/v1/status").json()
    assert code == 0, line
    assert status["finished"] and len(status["clients"]) == 1
    saved = state.load(url)
    assert saved.token != "forgotten" and saved.client_id == status["clients"][0]["client_id"]
    assert not (state.path / "pending.safetensors").exists()


def test_a_stale_state_of_another_run_says_to_delete_the_state_dir(capsys, spec, tmp_path, tiny_bert_dir):
    config = make_config(spec, min_clients=1, rounds=1)
    with running_server(config, tmp_path / "server") as http:
        url = str(http.base_url).rstrip("/")
        stale_state(tmp_path, url, config.run_config() | {"lora_alpha": 8.0})
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir)
        clients = http.get("/v1/status").json()["clients"]
    assert code == 2, line
    assert "runs another run (lora_alpha changed): delete --state-dir" in line
    assert clients == []
