"""`HETLORA_*` environment variables for the main flags of the long-running commands (serve, client).

Each variable in ENV_FLAGS stands for one long flag, named `HETLORA_` + the flag in upper case with `_` for `-`
(HETLORA_STATE_DIR = --state-dir). Precedence, implemented once in hetlora.config_file.expand: the command
line, then the environment, then the --config file, then the flag's default. A switch is on for 1/true/yes/on
and left as the file or default has it for 0/false/no/off/empty. A value is checked like the flag's own
(its type and choices) and a bad one is a one-line error naming the variable. A relative path is relative
to the working directory, as on the command line. A variable of a flag in a mutually exclusive group is
ignored when the command line or the file gives another flag of that group (the command line wins).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from hetlora.errors import UserError

PREFIX = "HETLORA_"
ENV_FLAGS: dict[str, tuple[str, ...]] = {
    "client": ("server", "data", "state-dir", "model", "backend", "artifacts", "rank", "name", "ca-file",
               "enroll-secret-file", "profile-file", "give-up-after", "threads", "watts", "no-progress"),
    "serve": ("state-dir", "host", "port", "model", "labels", "policy", "ssl-certfile", "ssl-keyfile",
              "enroll-secret-file", "admin-token-file", "allow-names", "trusted-proxy"),
}
TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def variable(flag: str) -> str:
    """The environment variable of a long flag (without `--`): state-dir -> HETLORA_STATE_DIR."""
    return PREFIX + flag.upper().replace("-", "_")


def help_epilog(command: str) -> str:
    """The --help paragraph naming the command's variables and the precedence."""
    names = ", ".join(variable(f) for f in ENV_FLAGS.get(command, ()))
    return (f"environment: {names} stand for the flags they name. Precedence: the command line, then these "
            "variables, then the --config file, then the defaults shown.")


def env_argv(command: str, parser: argparse.ArgumentParser, given: list[str],
             environ: Mapping[str, str] | None = None) -> list[str]:
    """The flags `command`'s set HETLORA_* variables stand for, checked like the flags (UserError naming the
    variable); `given`: the flags of the file and the command line, whose mutually exclusive partners win."""
    environ = os.environ if environ is None else environ
    options = parser._option_string_actions
    given_actions = {options[a.split("=", 1)[0]] for a in given if a.split("=", 1)[0] in options}
    argv: list[str] = []
    for flag in ENV_FLAGS.get(command, ()):
        name, action = variable(flag), options[f"--{flag}"]
        if name not in environ or _partner_given(parser, action, given_actions):
            continue
        value = environ[name].strip()
        if action.nargs == 0:
            if value.lower() not in TRUE + FALSE:
                raise UserError(f"{name}={value!r}: --{flag} is a switch; set {name} to 1 or 0")
            argv += [f"--{flag}"] if value.lower() in TRUE else []
            continue
        _check(name, value, action)
        argv += [f"--{flag}", value]
    return argv


def _partner_given(parser: argparse.ArgumentParser, action: argparse.Action, given: set) -> bool:
    return any(action in group._group_actions and given & (set(group._group_actions) - {action})
               for group in parser._mutually_exclusive_groups)


def _check(name: str, value: str, action: argparse.Action) -> None:
    """UserError when `value` is not one the flag takes (its type, its choices)."""
    try:
        converted = action.type(value) if callable(action.type) else value
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise UserError(f"{name}={value!r}: not a valid {action.option_strings[-1]} value ({exc})") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{name}={value!r}: choose one of {', '.join(map(str, action.choices))}")
