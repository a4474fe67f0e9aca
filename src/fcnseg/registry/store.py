"""Access to the MLflow registry store: the client for a URI, the database file behind a SQLite URI, retries while
SQLite is locked by another process, and MLflow's errors turned into the user's one line."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.exceptions import MlflowException

from fcnseg.errors import TrackingError, one_line
from fcnseg.runs import auth_problem, sqlite_path  # noqa: F401 (sqlite_path: used below and by callers)

LOCKED_RETRIES = 6  # "database is locked": another process holds SQLite's write lock; back off and retry
T = TypeVar("T")


def client_for(tracking_uri: str) -> mlflow.MlflowClient:
    """A client whose tracking and registry stores are both ``tracking_uri`` (so ``client.tracking_uri`` names the
    registry too: every function of :mod:`fcnseg.registry` expects such a client)."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow database at {db}; train a model first (it creates the store) or pass "
                            f"--tracking-uri / set MLFLOW_TRACKING_URI to the store that holds your runs")
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def store_uri(client: mlflow.MlflowClient) -> str:
    """The store a :func:`client_for` client talks to (tracking and registry alike), from MLflow's public API."""
    return client.tracking_uri


def is_locked_error(exc: BaseException) -> bool:
    """True when SQLite's "database is locked" is anywhere in the exception's chain (MLflow wraps it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if "database is locked" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Calls the store, retrying with exponential backoff while SQLite reports 'database is locked'."""
    delay = 0.2
    for attempt in range(LOCKED_RETRIES + 1):
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # MLflow wraps the sqlite3/SQLAlchemy error in an MlflowException
            if attempt == LOCKED_RETRIES or not is_locked_error(exc):
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


@contextlib.contextmanager
def as_tracking_error(action: str, client: mlflow.MlflowClient) -> Iterator[None]:
    """MLflow's refusals inside the block become one TrackingError line: a missing login says which variables to
    set, anything else names the action and the store."""
    try:
        yield
    except MlflowException as exc:
        auth = auth_problem(exc, action, store_uri(client))
        if auth:
            raise TrackingError(auth) from exc
        raise TrackingError(f"cannot {action} in {store_uri(client)}: {one_line(exc)}") from exc
