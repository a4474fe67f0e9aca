"""Empty MLflow SQLite stores with their schema already in place, for tests.

A new SQLite store runs all of MLflow's schema migrations the first time any process opens it: about 2 s of CPU
(5 s of wall time on a busy 2-core machine) that each test with a store of its own would pay again, in its
training subprocess or in its server, before anything it checks happens. The tests copy one store migrated once
per worker instead. It is a real store: MLflow finds its tables at the head revision, and creates the Default
experiment itself (deleted from the template, so its artifact location is that of the store that uses it).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path


def build_template(db: Path) -> Path:
    """Migrates a new SQLite store at ``db`` to MLflow's head schema and empties it again."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{db}", str(db.parent / "artifacts"))
    store.engine.dispose()
    with sqlite3.connect(db) as connection:
        connection.execute("DELETE FROM experiments")  # the Default experiment, with this folder's artifact path
    connection.close()
    return db


def seed_store(db: Path, template: Path) -> Path:
    """A copy of the migrated, empty ``template`` at ``db``, unless a store is there already."""
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)
    return db
