"""The test tree's own layout: what test modules share lives in tests/helpers (and shared
fixtures in tests/conftest.py), never in another test module, so moving or deleting a test file
cannot break an unrelated one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).parent
HELPERS = TESTS / "helpers"
TEST_MODULE = re.compile(r"^tests(\.\w+)*\.test_\w+$")


def modules_named_test() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def python_files_outside_helpers() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if HELPERS not in p.parents)


def imported_modules(tree: ast.AST) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.append(node.module)
            # `from tests import test_x` names a test module as an imported name.
            found += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found += [f"relative.{node.module or alias.name}" for alias in node.names]
    return found


def fixtures_named(tree: ast.Module, name: str) -> list[ast.FunctionDef]:
    def is_fixture(decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return ast.unparse(target) in ("pytest.fixture", "fixture")

    return [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and node.name == name
        and any(is_fixture(d) for d in node.decorator_list)
    ]


def body_of(function: ast.FunctionDef) -> str:
    """The statements, without a docstring: what the fixture does."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return "\n".join(ast.dump(statement) for statement in body)


def test_no_test_module_imports_another_test_module() -> None:
    offenders = []
    for path in modules_named_test():
        tree = ast.parse(path.read_text(), str(path))
        for module in imported_modules(tree):
            last = module.rsplit(".", 1)[-1]
            if TEST_MODULE.match(module) or (
                module.startswith("relative.") and last.startswith("test_")
            ):
                offenders.append(f"{path.relative_to(TESTS.parent)} imports {module}")
    assert offenders == [], "move what they share into tests/helpers:\n" + "\n".join(offenders)


def test_the_fake_fixture_is_defined_once_and_other_ones_use_the_factory() -> None:
    [shared] = fixtures_named(ast.parse((TESTS / "conftest.py").read_text()), "fake")
    copies, hand_built = [], []
    for path in python_files_outside_helpers():
        if path == TESTS / "conftest.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for fixture in fixtures_named(tree, "fake"):
            where = f"{path.relative_to(TESTS.parent)}:{fixture.lineno}"
            if body_of(fixture) == body_of(shared):
                copies.append(where)
            elif "serve_fake" not in ast.unparse(fixture):
                hand_built.append(where)
    assert copies == [], "the same `fake` as tests/conftest.py's; delete it:\n" + "\n".join(copies)
    assert hand_built == [], (
        "a `fake` fixture of its own must be built with tests.helpers.fakes.serve_fake, "
        "so only its arguments differ:\n" + "\n".join(hand_built)
    )


def test_each_helper_name_is_defined_in_one_helper_module() -> None:
    """Two helpers of one name (say, two RUNNER constants for different callers) would let an
    import from the wrong module pass unnoticed."""
    homes: dict[str, list[str]] = {}
    for path in sorted(HELPERS.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            targets: list[ast.expr] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                homes.setdefault(node.name, []).append(path.stem)
            elif isinstance(node, ast.Assign):
                targets = node.targets
            for target in targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                for name in names:
                    if isinstance(name, ast.Name):
                        homes.setdefault(name.id, []).append(path.stem)
    shared = {name: where for name, where in homes.items() if len(where) > 1}
    assert shared == {}, shared
