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
HETLORA_* environment variables (hetlora.env_flags) sit between the two: the command line wins over the
environment, which wins over the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hetlora.env_flags import env_argv
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


def command_index(argv: list[str], commands) -> int | None:
    """The index of the command name in `argv` (its first non-option word) when it is one of `commands`."""
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    return at if at is not None and argv[at] in commands else None


def config_value(flags: list[str]) -> str | None:
    """The --config value among a command's `flags`, if any."""
    for i, arg in enumerate(flags):
        if arg.startswith(OPTION + "="):
            return arg.partition("=")[2]
        if arg == OPTION and i + 1 < len(flags):
            return flags[i + 1]
    return None


def expand(argv: list[str], subparsers: dict[str, argparse.ArgumentParser], environ=None) -> list[str]:
    """`argv` with the flags of the command's --config file, then of its HETLORA_* variables (hetlora.env_flags),
    inserted right after the command name: argparse keeps a flag's last value, so the command line wins over the
    environment, which wins over the file."""
    at = command_index(argv, {n for n, p in subparsers.items() if OPTION in p._option_string_actions})
    if at is None:
        return argv
    command, given = argv[at], argv[at + 1:]
    path = config_value(given)
    from_file = config_argv(path, subparsers[command], command) if path is not None else []
    return argv[:at + 1] + from_file + env_argv(command, subparsers[command], from_file + given, environ) + given
