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



# The HTTP layer: app.py and the parts only it uses (enrollment, read guard, body limit, its error type).
HTTP_LAYER = ("server_stub/app.py", "server_stub/errors.py", "server_stub/enrollment.py", "server_stub/read_access.py",
              "server_stub/limits.py")


def raised_api_errors(path: str, tree: ast.AST) -> list[str]:
    """`raise ApiError(...)` outside the HTTP layer: domain code raises hetlora.engine.errors kinds instead."""
    return [f"{path}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
            and getattr(node.exc.func, "id", None) == "ApiError" and path not in HTTP_LAYER]


def plan_indexing(path: str, tree: ast.AST) -> list[str]:
    """`plan["..."]` (a plan read as a dict): plans are ClientPlan objects up to the wire and store boundary."""
    return [f"{path}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "plan"
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)]


def test_domain_code_raises_no_http_error_and_reads_no_plan_as_a_dict():
    trees = [(path, tree) for package in PRODUCT for path, tree in modules(package)]
    assert [hit for path, tree in trees for hit in raised_api_errors(path, tree)] == []
    assert [hit for path, tree in trees for hit in plan_indexing(path, tree)] == []


def test_the_source_checks_see_what_they_look_for():
    tree = ast.parse('def f(plan):\n    if plan["rank"]:\n        raise ApiError(400, "x", "y")\n')
    assert raised_api_errors("server_stub/rounds.py", tree) == ["server_stub/rounds.py:3"]
    assert raised_api_errors("server_stub/app.py", tree) == []
    assert plan_indexing("hetlora/engine/x.py", tree) == ["hetlora/engine/x.py:2"]
