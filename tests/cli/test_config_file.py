"""`--config FILE` (TOML) for serve and client: the file stands for the same flags, the command line wins,
unknown keys and wrong value kinds are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetlora.cli import _subparsers, build_parser, main
from hetlora.config_file import expand, long_options, read_config

PROJECT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]):
    parser = build_parser()
    return parser.parse_args(expand(argv, _subparsers(parser)))


def test_serve_config_equals_the_same_flags_and_the_command_line_wins(tmp_path):
    (tmp_path / "serve.toml").write_text(
        'model = "models/base"\nlabels = "labels.json"\nranks = [2, 4, 8]\nrounds = 7\naggregator = "hlora"\n'
        'segment-average = true\nserver-lr = 0.5\ntargets = ["query", "value"]\nhost = "0.0.0.0"\n')
    flags = ["--model", str(tmp_path / "models/base"), "--labels", str(tmp_path / "labels.json"), "--ranks", "2,4,8", "--rounds", "7",
             "--aggregator", "hlora", "--segment-average", "--server-lr", "0.5", "--targets", "query,value",
             "--host", "0.0.0.0"]
    from_file = parse(["serve", "--config", str(tmp_path / "serve.toml")])
    from_flags = parse(["serve", *flags])
    assert vars(from_file) | {"config": None} == vars(from_flags) | {"config": None}
    assert from_file.ranks == (2, 4, 8) and from_file.targets == ("query", "value") and from_file.segment_average
    overridden = parse(["-v", "serve", "--rounds", "3", f"--config={tmp_path / 'serve.toml'}", "--host", "127.0.0.1"])
    assert (overridden.rounds, overridden.host, overridden.aggregator, overridden.verbosity) == (3, "127.0.0.1",
                                                                                              "hlora", 1)


def test_client_config_supplies_required_flags(tmp_path):
    (tmp_path / "client.toml").write_text('server = "http://127.0.0.1:8080"\ndata = "d.csv"\nstate-dir = "state"\n'
                                          'backend = "executorch"\nartifacts = "art"\nno-progress = true\n')
    args = parse(["client", "--config", str(tmp_path / "client.toml"), "--lr", "0.5"])
    assert (args.server, args.data, args.state_dir, args.backend, args.artifacts, args.no_progress, args.lr) == \
        ("http://127.0.0.1:8080", str(tmp_path / "d.csv"), str(tmp_path / "state"), "executorch", str(tmp_path / "art"),
         True, 0.5)
    (tmp_path / "off.toml").write_text('server = "http://h"\ndata = "d"\nstate-dir = "s"\nno-progress = false\n')
    assert parse(["client", "--config", str(tmp_path / "off.toml")]).no_progress is False


@pytest.mark.parametrize("text,message", [
    ('rounds = 3\nround = 4\n', "unknown key 'round' for hetlora serve"),
    ('state_dir = "x"\n', "unknown key 'state_dir' for hetlora serve; did you mean 'state-dir'?"),
    ('segment-average = "yes"\n', "segment-average is a switch; write segment-average = true or false"),
    ('rounds = true\n', "rounds takes a value"),
    ('rounds = 3\nrounds = 4\n', "is not valid TOML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, message):
    (tmp_path / "bad.toml").write_text(text)
    assert main(["serve", "--config", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_value_argparse_refuses_is_reported_as_from_the_command_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('aggregator = "fedprox"\n')
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config", str(tmp_path / "bad.toml")])
    assert exc.value.code == 2 and "invalid choice: 'fedprox'" in capsys.readouterr().err


def test_paths_in_a_config_file_are_relative_to_the_file(tmp_path, monkeypatch):
    for folder in ("etc", "work"):
        (tmp_path / folder).mkdir()
    (tmp_path / "etc" / "client.toml").write_text('server = "http://h"\ndata = "d.csv"\nstate-dir = "/var/s"\n'
                                                  'ca-file = "~/ca.pem"\nname = "pi"\n')
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    args = parse(["client", "--config", "../etc/client.toml", "--model", "m"])
    assert Path(args.data).resolve() == tmp_path / "etc" / "d.csv"
    assert (args.state_dir, args.ca_file, args.name, args.model) == ("/var/s", str(tmp_path / "home" / "ca.pem"),
                                                                     "pi", "m")


def test_missing_config_file(tmp_path, capsys):
    assert main(["client", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read the config file" in capsys.readouterr().err


def test_the_device_service_example_is_a_valid_client_config():
    """deploy/systemd/client.toml names only `hetlora client` flags and, with the unit's --state-dir, supplies
    every required one."""
    client = _subparsers(build_parser())["client"]
    example = PROJECT / "deploy" / "systemd" / "client.toml"
    assert set(read_config(example)) <= set(long_options(client))
    args = parse(["client", "--config", str(example), "--state-dir", "/var/lib/hetlora/client"])
    assert (args.server, args.backend, args.no_progress) == ("https://192.168.1.20:8443", "auto", True)


def env_parse(argv: list[str], environ: dict):
    parser = build_parser()
    return parser.parse_args(expand(argv, _subparsers(parser), environ))


def test_the_command_line_wins_over_the_environment_which_wins_over_the_file(tmp_path):
    (tmp_path / "client.toml").write_text('server = "http://file"\ndata = "d.csv"\nstate-dir = "file-state"\n'
                                          'backend = "onnx"\nname = "from-file"\n')
    environ = {"HETLORA_SERVER": "http://env", "HETLORA_STATE_DIR": "env-state", "HETLORA_NO_PROGRESS": "yes",
               "HETLORA_PORT": "9999", "HOME": "/nowhere"}  # HETLORA_PORT is serve's: the client ignores it
    args = env_parse(["client", "--config", str(tmp_path / "client.toml"), "--state-dir", "cli-state"], environ)
    assert (args.server, args.state_dir, args.backend, args.name, args.data, args.no_progress) == \
        ("http://env", "cli-state", "onnx", "from-file", str(tmp_path / "d.csv"), True)
    # the environment alone supplies the required flags; an unset variable leaves the default
    args = env_parse(["client"], {"HETLORA_SERVER": "http://e", "HETLORA_DATA": "d", "HETLORA_STATE_DIR": "s"})
    assert (args.server, args.data, args.state_dir, args.backend, args.no_progress) == ("http://e", "d", "s", "torch",
                                                                                       False)
    serve = env_parse(["serve", "--port", "8081"], {"HETLORA_PORT": "9999", "HETLORA_HOST": "0.0.0.0",
                                                    "HETLORA_STATE_DIR": "srv", "HETLORA_SERVER": "ignored"})
    assert (serve.port, serve.host, serve.state_dir) == (8081, "0.0.0.0", "srv")


def test_a_variable_for_one_of_two_exclusive_flags_yields_to_the_command_line():
    args = env_parse(["client", "--server", "http://h", "--data", "d", "--state-dir", "s", "--enroll-secret", "x"],
                     {"HETLORA_ENROLL_SECRET_FILE": "/etc/secret"})
    assert (args.enroll_secret, args.enroll_secret_file) == ("x", None)


@pytest.mark.parametrize("variable,value,message", [
    ("HETLORA_PORT", "eighty", "HETLORA_PORT='eighty': not a valid --port value (invalid literal for int() with "
                               "base 10: 'eighty')"),
    ("HETLORA_BACKEND", "cuda", "HETLORA_BACKEND='cuda': choose one of torch, onnx, executorch, auto"),
    ("HETLORA_NO_PROGRESS", "maybe", "HETLORA_NO_PROGRESS='maybe': --no-progress is a switch; set HETLORA_NO_PROGRESS to 1 "
                                          "or 0"),
])
def test_a_bad_variable_is_a_one_line_error_naming_it(monkeypatch, capsys, variable, value, message):
    monkeypatch.setenv(variable, value)
    command = "serve" if variable == "HETLORA_PORT" else "client"
    assert main([command]) == 2
    assert capsys.readouterr().err.strip() == f"hetlora: error: {message}"


def test_help_names_the_variables_and_the_precedence(capsys):
    for command in ("serve", "client"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "HETLORA_STATE_DIR" in text and "Precedence: the command line, then these variables, then the " \
                                                  "--config file, then the defaults shown." in text
