"""The house's shape: imports between fcnseg's modules run one way (no circle, counting imports inside functions
too, which only hide a circle from the interpreter, not from the reader)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def fcnseg_imports(path: Path, modules: set[str]) -> set[str]:
    """The fcnseg modules a file imports, at any depth of the file (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & modules
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from fcnseg import registry` names a module; `from fcnseg.data import VOCDataModule` the package
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found |= {submodule if submodule in modules else node.module} & modules
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in (SRC / "fcnseg").rglob("*.py")}
    modules = set(files)
    return {name: fcnseg_imports(path, modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_among_fcnseg_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_model_and_metrics_stay_free_of_lightning_and_mlflow():
    # docs/layout.md: the model and the metrics are plain PyTorch / torchmetrics, usable on their own
    for path in [*(SRC / "fcnseg" / "models").glob("*.py"), SRC / "fcnseg" / "metrics.py"]:
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"lightning", "mlflow", "hydra"}, path.name
