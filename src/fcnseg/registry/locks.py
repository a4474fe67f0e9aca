"""Cross-process locks around the registry's read-compare-set sections: a file lock next to a SQLite database, or,
on a tracking server (MLflow has no compare-and-set on aliases), a lock held in the registry itself."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator

import mlflow
from mlflow.exceptions import MlflowException

from fcnseg.errors import TrackingError
from fcnseg.registry.store import retry, sqlite_path, store_uri

LOCK_TIMEOUT_S = 120.0
LOCK_STALE_S = 600.0  # a server-side lock older than this is left over by a dead process
LOCK_SUFFIX = ".promotion-lock"


@contextlib.contextmanager
def registry_lock(client: mlflow.MlflowClient, name: str) -> Iterator[None]:
    """Serialises read-compare-set sections on model ``name`` across processes and machines.

    SQLite store: a file lock next to the database (``<db>.promote.lock``). Any other store (a tracking server): a
    lock held in the registry itself, see :func:`server_lock`.
    """
    db = sqlite_path(store_uri(client))
    if db is None:
        with server_lock(client, name):
            yield
        return
    from filelock import FileLock, Timeout

    lock_path = db.with_name(db.name + ".promote.lock")
    try:
        with FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout as exc:
        raise TrackingError(f"another registry update has held {lock_path} for over {LOCK_TIMEOUT_S:.0f} s; "
                            f"wait for it to finish, or delete the lock file if no fcnseg process is running"
                            ) from exc


@contextlib.contextmanager
def server_lock(client: mlflow.MlflowClient, name: str) -> Iterator[None]:
    """A lock any MLflow registry can hold: the registered model ``<name>.promotion-lock``.

    Creating a registered model is atomic on every store (its name is the table's primary key): of concurrent
    creators exactly one succeeds, the others get RESOURCE_ALREADY_EXISTS (or RESOURCE_DOES_NOT_EXIST when the holder
    released it mid-request) and retry until it is deleted. A lock
    older than ``LOCK_STALE_S`` (its holder died) is broken.
    """
    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            retry(client.create_registered_model, lock, tags={"holder": holder, "acquired": repr(time.time())},
                  description="fcnseg promotion lock: held while a promotion runs; delete it if none is running")
            break
        except MlflowException as exc:
            # MLflow's SQL store answers a duplicate name by reading the existing model (to word its error); when its
            # holder deletes it in between, that read fails with RESOURCE_DOES_NOT_EXIST: the lock was just released.
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            held = retry(client.get_registered_model, lock)
            if time.time() - float((held.tags or {}).get("acquired", "inf")) > LOCK_STALE_S:
                retry(client.delete_registered_model, lock)  # its holder died; the next create wins
                continue
        except MlflowException:
            continue  # released meanwhile
        if time.monotonic() > deadline:
            raise TrackingError(f"registered model {lock!r} (another promotion of {name}) has been held for over "
                                f"{LOCK_TIMEOUT_S:.0f} s; wait, or delete it in the MLflow UI if none is running")
        time.sleep(0.05 + random.random() * 0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            retry(client.delete_registered_model, lock)
