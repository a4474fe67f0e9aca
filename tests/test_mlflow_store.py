"""The migrated store the tests start from (tests/mlflow_store.py) is a real, empty store of the test's own."""

from __future__ import annotations

import mlflow
import pytest


def test_a_seeded_store_is_empty_and_makes_its_own_default_experiment(tmp_path, mlflow_store_template):
    db = tmp_path / "mlflow.db"
    assert db.stat().st_size > 0  # seeded before the test ran
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    [default] = client.search_experiments()
    assert default.name == "Default" and str(mlflow_store_template.parent) not in default.artifact_location
    assert client.search_runs([default.experiment_id]) == []
    assert mlflow.MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}").search_registered_models() == []


@pytest.mark.fresh_mlflow_store
def test_the_marker_leaves_the_store_to_be_created(tmp_path):
    assert not (tmp_path / "mlflow.db").exists()
