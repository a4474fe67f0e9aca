"""Version pins: pyproject.toml admits only the releases CI tests (>= the tested one, < the next minor), and the
private APIs of Lightning, MLflow and Hydra that fcnseg relies on (where there is no public one) still behave as fcnseg
uses them in the installed, pinned versions. A new private use in src/ fails here until it is listed and checked."""

from __future__ import annotations

import ast
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fcnseg"

# Every private name of another package that src/ imports or reads, and where. Each one is exercised below.
PRIVATE_USES = {
    ("mlflow.tracking._model_registry", "utils"): "runs.py",  # its _registry_uri global: using_store
    ("mlflow.tracking._tracking_service", "utils"): "runs.py",  # its _tracking_uri global: using_store
    ("hydra._internal.utils", "get_args_parser"): "cli_errors.py",
    ("attribute", "_tracking_uri"): "tracking.py, run_dir.py, runs.py",  # MLFlowLogger's, and MLflow's global
    ("attribute", "_registry_uri"): "runs.py",  # MLflow's global default registry
}


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for group in (project["dependencies"], *project["optional-dependencies"].values())
            for line in group]


def test_every_dependency_admits_only_the_tested_minor_release():
    for requirement in requirements():
        [spec] = list(requirement.specifier)  # one clause: ==X.Y.Z or ~=X.Y.Z
        assert spec.operator in ("==", "~="), f"{requirement}: an open range admits releases CI never tested"
        pinned = Version(spec.version)
        assert len(pinned.release) == 3, f"{requirement}: ~=X.Y would admit every later minor release"
        installed = Version(version(requirement.name))
        assert installed in requirement.specifier, f"{requirement.name} {installed} is outside {requirement}"
        assert (installed.major, installed.minor) == (pinned.major, pinned.minor)


def private_uses_in_src() -> set[tuple[str, str]]:
    """(module, name) of each private import from another package, and (class, attribute) of private reads."""
    found = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] not in ("fcnseg", "__future__")):
                private_module = any(part.startswith("_") for part in node.module.split("."))
                found |= {(node.module, alias.name) for alias in node.names
                          if private_module or alias.name.startswith("_")}
            elif isinstance(node, ast.Import):
                found |= {(alias.name, "") for alias in node.names
                          if any(part.startswith("_") for part in alias.name.split("."))}
            elif isinstance(node, ast.Attribute) and node.attr in ("_tracking_uri", "_registry_uri"):
                found.add(("attribute", node.attr))
    return found


def test_src_uses_no_private_api_beyond_the_checked_list():
    unknown = private_uses_in_src() - set(PRIVATE_USES)
    assert not unknown, f"private APIs not pinned and checked in tests/test_pins.py: {sorted(unknown)}"


def test_mlflow_default_store_globals_are_what_set_tracking_uri_sets(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    assert tracking_state._tracking_uri == uri and registry_state._registry_uri == uri
    tracking_state._tracking_uri = registry_state._registry_uri = None  # what using_store restores to
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri exported it; using_store restores it
    assert mlflow.get_tracking_uri() != uri  # None means "MLflow's default", as using_store relies on


def test_mlflow_logger_keeps_its_tracking_uri_in_the_private_attribute(tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert MLFlowLogger(experiment_name="pins", tracking_uri=uri)._tracking_uri == uri


@pytest.mark.parametrize("argv, cfg", [(["--cfg", "job", "model=fcn32s"], "job"), (["model=fcn32s"], None)])
def test_hydra_args_parser_splits_flags_from_overrides(argv, cfg):
    from hydra._internal.utils import get_args_parser

    parsed = get_args_parser().parse_args(argv)
    assert parsed.cfg == cfg and parsed.overrides == ["model=fcn32s"]
    assert hasattr(parsed, "info") and hasattr(parsed, "config_dir") and hasattr(parsed, "experimental_rerun")
