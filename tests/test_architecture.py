"""The layout's rules, checked on the source: which package may import which, and size limits.

Layers (docs/ARCHITECTURE.md): hetlora.protocol at the bottom (both sides import it, it imports neither),
edge_client (the device) and server_stub + profiles (the server side) beside each other, simulation and
hetlora_flower (the Flower apps) on top.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("hetlora", "edge_client", "server_stub", "profiles", "exporter", "simulation", "hetlora_flower")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
# The allowed crossings: the server derives the adapter spec from the model folder with transformers, and `serve`
# writes the run's result as a PEFT folder with the client's exporter (transformers' tokenizer, already loaded).
ALLOWED = {("server_stub/cli.py", "edge_client.models"), ("server_stub/cli.py", "edge_client.peft_export")}


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
    found = []
    for package in packages:
        for path, tree in modules(package):
            for name in imported(tree):
                if name.split(".")[0] in forbidden and (path, name) not in ALLOWED:
                    found.append(f"{path} imports {name}")
    return found


@pytest.mark.parametrize("packages, forbidden", [
    (("server_stub", "profiles"), ("edge_client", "simulation", "hetlora_flower")),
    (("edge_client",), ("server_stub", "simulation", "hetlora_flower")),
    (("hetlora/protocol",), ("edge_client", "server_stub", "profiles", "simulation", "exporter", "torch",
                             "transformers", "fastapi")),
])
def test_no_import_crosses_the_layers(packages, forbidden):
    assert crossings(packages, forbidden) == []


def test_the_checker_sees_a_crossing():
    assert any(path.startswith("simulation/") for path in crossings(("simulation",), ("edge_client",)))


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


TESTS = ROOT / "tests"


def sources_of_tests() -> list[tuple[str, ast.AST]]:
    """(path, syntax tree) of every Python file under tests/ but the fake system roots."""
    return [(path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path)))
            for path in sorted(TESTS.rglob("*.py")) if "fakeroots" not in path.parts]


def imports_of_test_modules(tree: ast.AST) -> set[str]:
    """The test modules (tests.test_*) `tree` imports, at any depth."""
    names = set(imported(tree))
    names |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and node.module == "tests" for alias in node.names}
    return {name for name in names if name.startswith("tests.test_") or name.startswith("test_")}


def test_no_test_module_imports_another():
    found = [f"{path} imports {name}" for path, tree in sources_of_tests() for name in imports_of_test_modules(tree)]
    assert found == [], "shared test helpers live in tests/helpers/ or tests/conftest.py"


def test_the_test_import_checker_sees_an_import_of_a_test_module():
    tree = ast.parse("import tests.test_server\nfrom tests.test_bounds import moved\nfrom tests import test_x\n"
                     "from tests.helpers.server import make_config\nfrom test_device_energy import drive\n")
    assert imports_of_test_modules(tree) == {"tests.test_server", "tests.test_bounds", "tests.test_x",
                                             "test_device_energy"}


# The one optional platform part a test may skip without: onnxruntime-training has no Linux aarch64 wheel
# (pyproject.toml's export extra). Everything else the tests import is the product or in its dev extra.
OPTIONAL_PLATFORM_MODULES = {"onnxruntime.training"}


def hiding_skips(tree: ast.AST) -> list[str]:
    """importorskip of anything but an optional platform part, and pytest.skip inside `except ImportError`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip":
            target = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else "?"
            if target not in OPTIONAL_PLATFORM_MODULES:
                found.append(f"line {node.lineno}: importorskip({target!r})")
        if isinstance(node, ast.ExceptHandler) and "ImportError" in ast.unparse(node.type or ast.Name("")):
            found += [f"line {call.lineno}: skip on ImportError" for call in ast.walk(node)
                      if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "skip"]
    return found


def test_no_skip_hides_an_import_error_of_the_product_or_a_hard_dependency():
    found = [f"{path} {skip}" for path, tree in sources_of_tests() for skip in hiding_skips(tree)]
    assert found == []


def test_the_skip_checker_sees_a_hiding_skip():
    tree = ast.parse('import pytest\npolicy = pytest.importorskip("profiles.policy")\n'
                     'try:\n    import torch\nexcept ImportError:\n    pytest.skip("no torch")\n'
                     'pytest.importorskip("onnxruntime.training")\n')
    assert hiding_skips(tree) == ["line 2: importorskip('profiles.policy')", "line 6: skip on ImportError"]
