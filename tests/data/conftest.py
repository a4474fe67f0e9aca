"""The data layer's tests open no MLflow store, and several check that a download or a write leaves nothing else
in their folder: their ``tmp_path`` starts empty, without the migrated store tests/conftest.py puts there."""

import pytest


@pytest.fixture(autouse=True)
def _migrated_mlflow_store():
    """Overrides tests/conftest.py's fixture of the same name: no store here."""
