"""The layout's rules, checked on the source: which package may import which, and size limits.

Layers (docs/ARCHITECTURE.md): hetlora.protocol at the bottom (both sides import it, it imports neither), the model
layer hetlora.models beside it (torch and transformers, no side), hetlora.engine (the round engine, no transport)
above them with profiles, edge_client (the device) and the two transports of the engine, server_stub (HTTP) and
hetlora_flower (Flower), above that; neither transport imports the other; simulation on top.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("hetlora", "edge_client", "server_stub", "profiles", "exporter", "simulation", "hetlora_flower")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


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
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    found.append(f"{path} imports {name}")
    return found


TRANSPORTS = ("server_stub", "hetlora_flower", "fastapi", "starlette", "uvicorn", "flwr")


@pytest.mark.parametrize("packages, forbidden", [
    (("server_stub", "profiles"), ("edge_client", "simulation", "hetlora_flower")),
    (("hetlora_flower",), ("server_stub",)),  # both transports call the engine, neither the other
    (("hetlora/engine", "profiles"), ("edge_client", "simulation", "exporter", "torch") + TRANSPORTS),
    (("edge_client",), ("server_stub", "simulation", "hetlora_flower", "hetlora.engine")),
    (("hetlora/protocol",), ("edge_client", "server_stub", "profiles", "simulation", "exporter", "torch",
                             "transformers", "fastapi", "hetlora.engine", "hetlora.models")),
    (("hetlora/models",), ("edge_client", "simulation", "exporter", "profiles", "hetlora.engine") + TRANSPORTS),
    # the ground floor: the command shell loads the commands above it by name (hetlora/cli.py COMMANDS)
    (("hetlora",), ("edge_client", "server_stub", "hetlora_flower", "simulation", "exporter")),
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


TESTS = ROOT / "tests"


def sources_of_tests() -> list[tuple[str, ast.AST]]:
    """(path, syntax tree) of every Python file under tests/ but the fake system roots."""
    return [(path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path)))
            for path in sorted(TESTS.rglob("*.py")) if "fakeroots" not in path.parts]


def is_test_module(name: str) -> bool:
    """tests.test_x, tests.<folder>.test_x, or a bare test_x (pytest puts each test folder on sys.path)."""
    parts = name.split(".")
    return parts[-1].startswith("test_") and (len(parts) == 1 or parts[0] == "tests")


def imports_of_test_modules(tree: ast.AST) -> set[str]:
    """The test modules `tree` imports, at any depth (is_test_module)."""
    names = set(imported(tree))
    names |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and node.module and node.module.split(".")[0] == "tests" for alias in node.names}
    return {name for name in names if is_test_module(name)}


def test_no_test_module_imports_another():
    found = [f"{path} imports {name}" for path, tree in sources_of_tests() for name in imports_of_test_modules(tree)]
    assert found == [], "shared test helpers live in tests/helpers/ or tests/conftest.py"


def test_the_test_import_checker_sees_an_import_of_a_test_module():
    tree = ast.parse("import tests.test_server\nfrom tests.test_bounds import moved\nfrom tests import test_x\n"
                     "from tests.helpers.server import make_config\nfrom test_device_energy import drive\n"
                     "import tests.server.test_trust\nfrom tests.engine import test_robust\n"
                     "from tests.client.test_data import rows\nfrom tests.helpers import fleet\n")
    assert imports_of_test_modules(tree) == {"tests.test_server", "tests.test_bounds", "tests.test_x",
                                             "test_device_energy", "tests.server.test_trust",
                                             "tests.engine.test_robust", "tests.client.test_data"}


# One folder per package under test (docs/ARCHITECTURE.md, "Tests"); this file stays at the top.
TEST_FOLDERS = {"protocol", "engine", "profiles", "server", "client", "exporter", "flower", "simulation", "cli", "deploy"}


def misplaced_tests(paths) -> list[str]:
    """Test files (paths relative to tests/) not directly inside one of TEST_FOLDERS, but this file."""
    return [path for path in paths if path != "test_architecture.py"
            and (len(path.split("/")) != 2 or path.split("/")[0] not in TEST_FOLDERS)]


def test_every_test_file_lives_in_the_folder_of_its_package():
    found = misplaced_tests(sorted(path.relative_to(TESTS).as_posix() for path in TESTS.rglob("test_*.py")))
    assert found == [], f"test files go in tests/<folder>/, one of {sorted(TEST_FOLDERS)} (docs/ARCHITECTURE.md)"


def test_the_layout_checker_sees_a_misplaced_test():
    paths = ["test_architecture.py", "test_x.py", "server/test_y.py", "server/sub/test_z.py", "helpers/test_w.py"]
    assert misplaced_tests(paths) == ["test_x.py", "server/sub/test_z.py", "helpers/test_w.py"]


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
