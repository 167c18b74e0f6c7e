"""`--config FILE`: a TOML file whose keys are a command's long flag names, e.g. for `hetlora client`

    server = "https://192.168.1.20:8443"
    data = "/var/lib/hetlora/data.csv"
    state-dir = "/var/lib/hetlora/state"
    backend = "executorch"
    no-progress = true

Each key becomes the flag it names (a list becomes a comma-separated value, `true` a switch, `false`
leaves a switch off) placed before the command line's own flags, so argparse checks the file like
the command line and a flag given on the command line wins. Unknown keys are an error. A relative path
in the file (the keys of PATH_KEYS; `~` expanded) is relative to the file's folder, so the file works from
any working directory; on the command line, paths stay relative to the working directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hetlora.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OPTION = "--config"
# The path-valued flags of the commands that take --config (serve, client).
PATH_KEYS = frozenset({"data", "state-dir", "model", "artifacts", "labels", "policy", "init-adapter", "ca-file",
                       "enroll-secret-file", "profile-file", "allow-names", "admin-token-file", "ssl-certfile",
                       "ssl-keyfile"})


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(OPTION, metavar="FILE", help="read flags from a TOML file (keys: the long flag names without "
                                                "--); flags on the command line override it")


def long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long flag name without `--` -> its action, for every flag of `parser` except --help and --config."""
    return {opt[2:]: action for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt not in ("--help", OPTION)}


def read_config(path: str | Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise UserError(f"cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from None


def config_argv(path: str | Path, parser: argparse.ArgumentParser, command: str) -> list[str]:
    """The flags the TOML file at `path` stands for, checked against `parser`'s options."""
    options = long_options(parser)
    argv: list[str] = []
    for key, value in read_config(path).items():
        action = options.get(key)
        if action is None:
            near = [k for k in options if k.replace("_", "-") == key.replace("_", "-")]
            hint = f"did you mean {near[0]!r}?" if near else f"`hetlora {command} --help` lists the flags"
            raise UserError(f"{path}: unknown key {key!r} for hetlora {command}; {hint}")
        argv += flag_argv(path, key, value, action)
    return argv


def flag_argv(path, key: str, value, action: argparse.Action) -> list[str]:
    """One key's flags: a switch for `true`, nothing for `false`, else `--key value`."""
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise UserError(f"{path}: {key} is a switch; write {key} = true or false")
        return [f"--{key}"] if value else []
    if isinstance(value, bool) or isinstance(value, dict):
        raise UserError(f"{path}: {key} takes a value (a string, number or list), not {value!r}")
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    elif key in PATH_KEYS and isinstance(value, str):
        value = Path(path).parent / Path(value).expanduser()
    return [f"--{key}", str(value)]


def config_path(argv: list[str], commands) -> tuple[int, str] | None:
    """(index of the command name, the --config value) when `argv` runs one of `commands` with --config."""
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None or argv[at] not in commands:
        return None
    for i, arg in enumerate(argv[at + 1:], start=at + 1):
        if arg.startswith(OPTION + "="):
            return at, arg.partition("=")[2]
        if arg == OPTION and i + 1 < len(argv):
            return at, argv[i + 1]
    return None


def expand(argv: list[str], subparsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """`argv` with the flags of the command's --config file inserted right after the command name."""
    found = config_path(argv, {n for n, p in subparsers.items() if OPTION in p._option_string_actions})
    if found is None:
        return argv
    at, path = found
    return argv[:at + 1] + config_argv(path, subparsers[argv[at]], argv[at]) + argv[at + 1:]
