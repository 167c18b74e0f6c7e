"""`--config FILE` (TOML) for serve and client: the file stands for the same flags, the command line wins,
unknown keys and wrong value kinds are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetlora.cli import _subparsers, build_parser, main
from hetlora.config_file import expand, long_options, read_config

PROJECT = Path(__file__).resolve().parents[1]


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
