"""`hetlora serve` argument handling: run config, rule options, labels, and the errors a user sees."""

from __future__ import annotations

import json

import pytest

from hetlora.cli import build_parser, main
from hetlora.errors import UserError


def config_for(tiny_bert_dir, labels_file, *extra):
    from server_stub.cli import build_config

    args = build_parser().parse_args(["serve", "--model", str(tiny_bert_dir), "--labels", str(labels_file),
                                      "--targets", "query,value", *extra])
    return build_config(args)


@pytest.fixture
def labels_file(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(["a", "b", "c", "d"]))
    return path


def test_run_config_carries_labels_rule_options_and_hints(tiny_bert_dir, labels_file):
    config = config_for(tiny_bert_dir, labels_file, "--aggregator", "hetlora", "--weighting", "n",
                        "--segment-average", "--ranks", "4,8", "--lr", "0.001")
    run = config.run_config()
    assert run["labels"] == ["a", "b", "c", "d"]
    assert run["rule_options"] == {"segment_average": True, "weighting": "n"}
    assert (run["global_rank"], run["ranks"], run["lora_alpha"]) == (8, [4, 8], 16.0)
    assert run["training"]["lr"] == 0.001 and run["training"]["prune_lambda"] == 0.01
    assert config.spec.dense["classifier.weight"] == (4, 32)
    assert run["spec_fingerprint"] == config.spec.fingerprint


def test_hlora_rank_sets_the_global_rank_and_other_rules_do_not_prune(tiny_bert_dir, labels_file):
    config = config_for(tiny_bert_dir, labels_file, "--aggregator", "hlora", "--hlora-rank", "96")
    assert config.global_rank == 96 and config.rule_options == {} and config.training.prune_lambda == 0.0


def test_label_file_with_one_label_per_line(tiny_bert_dir, tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("yes\n\nno\nmaybe\n")
    assert config_for(tiny_bert_dir, path).labels == ("yes", "no", "maybe")


@pytest.mark.parametrize("extra, message", [
    (("--aggregator", "plora", "--weighting", "n"), "hetlora options"),
    (("--aggregator", "hetlora", "--hlora-rank", "8"), "hlora option"),
    (("--ranks", "4,8", "--global-rank", "4"), "below the largest client rank"),
    (("--min-clients", "3", "--clients-per-round", "2"), "could never aggregate"),
])
def test_inconsistent_options_are_user_errors(tiny_bert_dir, labels_file, extra, message):
    with pytest.raises(UserError, match=message):
        config_for(tiny_bert_dir, labels_file, *extra)


def test_bad_label_files_are_user_errors(tiny_bert_dir, tmp_path):
    for text, message in (("[1, 2]", "must be a string"), ("only-one\n", "at least 2"), ("[oops", "not a valid JSON"),
                          ('["a", "a"]', "duplicates")):
        path = tmp_path / "labels"
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            config_for(tiny_bert_dir, path)
    with pytest.raises(UserError, match="cannot read the label file"):
        config_for(tiny_bert_dir, tmp_path / "missing.json")


def test_serve_refuses_a_state_dir_of_another_run_with_one_line(tiny_bert_dir, labels_file, tmp_path, capsys):
    from server_stub.app import build_coordinator

    state = tmp_path / "state"
    build_coordinator(config_for(tiny_bert_dir, labels_file, "--aggregator", "plora"), state).store.close()
    code = main(["serve", "--model", str(tiny_bert_dir), "--labels", str(labels_file), "--targets", "query,value",
                 "--aggregator", "hetlora", "--state-dir", str(state), "--port", "0"])
    assert code == 2
    assert 'aggregator: "plora" there, "hetlora" now' in capsys.readouterr().err
    assert not (state / "server.json").exists()


def test_the_policy_file_sizes_the_clients(tiny_bert_dir, labels_file, tmp_path):
    from profiles.catalog import profile_for
    from profiles.policy import DEFAULT_POLICY_PATH
    from hetlora.engine.tiers import tier_for

    policy = json.loads(DEFAULT_POLICY_PATH.read_text())
    for tier in policy["tiers"]:
        tier["batch_size"] = 2 if tier["rank"] else tier["batch_size"]
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps(policy))
    config = config_for(tiny_bert_dir, labels_file, "--policy", str(path))
    phone = profile_for("samsung-galaxy-a54")
    assert tier_for(phone, 64, config.ranks, policy=config.policy).batch_size == 2
    assert tier_for(phone, 64, config.ranks).batch_size > 2  # the packaged policy
    with pytest.raises(UserError, match="cannot read the tier policy"):
        config_for(tiny_bert_dir, labels_file, "--policy", str(tmp_path / "missing.json"))


@pytest.mark.integration
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_serve_stops_quietly_on_ctrl_c_and_sigterm(tiny_bert_dir, labels_file, tmp_path, sig):
    import signal

    from simulation.fleet import start_server

    proc, _ = start_server(["--model", str(tiny_bert_dir), "--labels", str(labels_file)], tmp_path / "state")
    proc.kill(getattr(signal, sig))  # as soon as it listens: uvicorn may not have its own handlers yet
    log = proc.log_path.read_text()
    assert proc.wait() == 0 and "Traceback" not in log and "RuntimeWarning" not in log, log
    assert log.rstrip().endswith(f"server stopped; state kept in {tmp_path / 'state'}")
