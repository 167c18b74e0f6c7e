"""The `hetlora` command.

Each subcommand lives in the part of the project it belongs to, as a module with
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only for the
subcommand that runs, so a device with the `client` extra never imports server or
exporter packages. Heavy imports inside a command module belong in `run`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from hetlora import __version__
from hetlora.config_file import expand as expand_config
from hetlora.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server_stub.cli", "run the aggregation server"),
    "client": ("edge_client.cli_client", "run the edge client against a server"),
    "demo": ("simulation.cli_demo", "simulate a heterogeneous fleet on loopback (the main job)"),
    "partition": ("edge_client.cli_partition", "split a dataset non-IID across clients"),
    "evaluate": ("edge_client.cli_evaluate", "evaluate a global adapter on a test file"),
    "peft": ("edge_client.cli_peft", "convert adapters to and from Hugging Face PEFT"),
    "profile": ("edge_client.cli_profile", "profile this device and pick its LoRA rank tier"),
    "bench": ("edge_client.cli_bench", "per-rank latency and energy benchmark"),
    "export": ("exporter.cli", "export trainable ExecuTorch / ONNX Runtime artifacts per rank"),
}


def _available_commands() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0].split(".")[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetlora", description="hetlora-edge: federated LoRA fine-tuning on heterogeneous edge devices.")
    parser.add_argument("--version", action="version", version=f"hetlora-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in _available_commands().items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # The part exists but its optional dependency is missing: keep --help working.
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {exc.name} not installed)")
            p.set_defaults(_unavailable=exc.name)
            continue
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = expand_config(argv, _subparsers(parser))
    except UserError as exc:
        print(f"hetlora: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"hetlora {args.command}: needs the Python package '{args._unavailable}'; "
              f"install the matching extra, e.g. pip install 'hetlora-edge[server]'", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"hetlora {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"hetlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
