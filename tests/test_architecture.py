"""The layout's rules, checked on the source: which package may import which, and size limits.

Layers (docs/ARCHITECTURE.md): hetlora.protocol at the bottom (both sides import it, it imports neither),
hetlora.engine (the round engine, no transport) above it with profiles, edge_client (the device) and the two
transports of the engine, server_stub (HTTP) and hetlora_flower (Flower), above that; neither transport imports
the other; simulation on top.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("hetlora", "edge_client", "server_stub", "profiles", "exporter", "simulation", "hetlora_flower")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
# The allowed crossings: a run's options derive the adapter spec from the model folder with transformers, and
# `serve` writes the run's result as a PEFT folder with the client's exporter (transformers' tokenizer, already loaded).
ALLOWED = {("hetlora/engine/run_options.py", "edge_client.models"), ("server_stub/cli.py", "edge_client.peft_export")}


def modules(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def crossings(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """Imports of a `forbidden` module or package (a dotted prefix: "hetlora.engine" forbids its submodules)."""
    found = []
    for package in packages:
        for path, tree in modules(package):
            for name in imported(tree):
                if any(name == f or name.startswith(f + ".") for f in forbidden) and (path, name) not in ALLOWED:
                    found.append(f"{path} imports {name}")
    return found


TRANSPORTS = ("server_stub", "hetlora_flower", "fastapi", "starlette", "uvicorn", "flwr")


@pytest.mark.parametrize("packages, forbidden", [
    (("server_stub", "profiles"), ("edge_client", "simulation", "hetlora_flower")),
    (("hetlora_flower",), ("server_stub",)),  # both transports call the engine, neither the other
    (("hetlora/engine", "profiles"), ("edge_client", "simulation", "exporter", "torch") + TRANSPORTS),
    (("edge_client",), ("server_stub", "simulation", "hetlora_flower", "hetlora.engine")),
    (("hetlora/protocol",), ("edge_client", "server_stub", "profiles", "simulation", "exporter", "torch",
                             "transformers", "fastapi", "hetlora.engine")),
])
def test_no_import_crosses_the_layers(packages, forbidden):
    assert crossings(packages, forbidden) == []


def test_the_checker_sees_a_crossing():
    assert any(path.startswith("simulation/") for path in crossings(("simulation",), ("edge_client",)))
    assert any(path.startswith("server_stub/") for path in crossings(("server_stub",), ("hetlora.engine",)))


def test_no_file_or_function_is_too_long():
    too_long = []
    for package in PRODUCT:
        for path, tree in modules(package):
            lines = len((ROOT / path).read_text().splitlines())
            if lines > MAX_FILE_LINES:
                too_long.append(f"{path}: {lines} lines")
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        too_long.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []
