"""The `hetlora` command.

COMMANDS is the whole list of subcommands: each one's module, in the part of the project it belongs to, has
`add_arguments(parser)` and `run(args) -> int`. The shell sits on the ground floor and imports no part above it
(tests/test_architecture.py checks): `load` imports a command's module by its name, and `main` loads only the
command that runs. So `hetlora --help` imports no command, `hetlora client` on a device with only the client extra
never imports the server or the exporter, and a command whose extra is not installed says which extra to install.
A command module's own import stays light (no torch, transformers, FastAPI): what its `run` needs from those it
imports in `run`, so `hetlora CMD --help` and argument errors are instant on a small device
(tests/cli/test_cli_output.py checks both).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType

from hetlora import __version__, output
from hetlora.config_file import command_index
from hetlora.config_file import expand as expand_config
from hetlora.env_flags import ENV_FLAGS, help_epilog
from hetlora.errors import UserError
from hetlora.extras import missing_extra_message


@dataclass(frozen=True)
class Command:
    module: str  # its add_arguments(parser) and run(args) -> int
    help: str  # one line in `hetlora --help`


COMMANDS: dict[str, Command] = {
    "serve": Command("server_stub.cli", "run the aggregation server"),
    "client": Command("edge_client.cli_client", "run the edge client against a server"),
    "demo": Command("simulation.cli_demo", "simulate a heterogeneous fleet on loopback (the main job)"),
    "partition": Command("edge_client.cli_partition", "split a dataset non-IID across clients"),
    "evaluate": Command("edge_client.cli_evaluate", "evaluate a global adapter on a test file"),
    "generate": Command("edge_client.cli_generate", "answer a prompt with the base model plus an adapter (streaming)"),
    "model": Command("hetlora.models.cli", "list the bundled base models, install (convert) them"),
    "peft": Command("edge_client.cli_peft", "convert adapters to and from Hugging Face PEFT"),
    "profile": Command("edge_client.cli_profile", "profile this device and pick its LoRA rank tier"),
    "bench": Command("edge_client.cli_bench", "per-rank latency and energy benchmark"),
    "export": Command("exporter.cli", "export trainable ExecuTorch / ONNX Runtime artifacts per rank"),
}


def load(name: str) -> ModuleType:
    """The module of command `name`, imported by name (ModuleNotFoundError when its extra is not installed)."""
    return importlib.import_module(COMMANDS[name].module)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, unless its help names one already or it has none (None, off, empty)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default
        return bool(action.option_strings) and not (default is None or default is False or default in ([], ())
                                                    or default == argparse.SUPPRESS)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text or not self._shows_default(action) else f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The command's parsers (subcommands and their own subcommands alike) show defaults in --help."""

    def __init__(self, *args, formatter_class=DefaultsHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """-v / -q, accepted before and after the subcommand, nested ones too (SUPPRESS: a subcommand never resets
    them)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=argparse.SUPPRESS,
                       help="debug logging, third-party messages included")
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                       default=argparse.SUPPRESS, help="warnings and errors only, no progress bars")


def _add_nested_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """-v / -q on every nested subcommand of `parser` (`hetlora peft export -q`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for nested in action.choices.values():
                if "-q" not in nested._option_string_actions:
                    add_verbosity_flags(nested)
                _add_nested_verbosity_flags(nested)


def build_parser(loaded=None) -> argparse.ArgumentParser:
    """The command's parser: every command listed, the arguments and run of the `loaded` ones (default: all)."""
    parser = Parser(
        prog="hetlora", description="hetlora-edge: federated LoRA fine-tuning on heterogeneous edge devices.")
    add_verbosity_flags(parser)
    parser.add_argument("--version", action="version", version=f"hetlora-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        if loaded is not None and name not in loaded:
            sub.add_parser(name, help=command.help)
            continue
        module = load(name)
        p = sub.add_parser(name, help=command.help, description=(module.__doc__ or command.help).strip(),
                           epilog=help_epilog(name) if name in ENV_FLAGS else None)
        add_verbosity_flags(p)
        module.add_arguments(p)
        _add_nested_verbosity_flags(p)
        p.set_defaults(_run=module.run)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _missing_package(command: str, exc: ModuleNotFoundError) -> int:
    """Exit status 2 with the extra that installs the missing package; re-raised if no extra installs it."""
    message = missing_extra_message(command, exc.name)
    if message is None:
        raise exc
    print(message, file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    at = command_index(argv, COMMANDS)
    name = argv[at] if at is not None else None
    try:
        parser = build_parser([name] if name else [])
    except ModuleNotFoundError as exc:
        return _missing_package(name, exc)
    try:
        argv = expand_config(argv, _subparsers(parser))
    except UserError as exc:
        print(f"hetlora: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    output.configure(getattr(args, "verbosity", 0))
    args.verbose = output.verbosity() > 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (`hetlora ... | head`): stop quietly, like a program killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ModuleNotFoundError as exc:
        return _missing_package(args.command, exc)
    except UserError as exc:
        print(f"hetlora {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"hetlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
