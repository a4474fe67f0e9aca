"""MLflow model registry: register a version (alias ``challenger``), promote it (alias ``champion``), list versions.

Promotion is gated: the ``champion`` alias moves to a version only when there is no champion yet, or when the
version's validation mean IoU (tag ``val_mean_iou``) is strictly higher than the champion's *and* both were
evaluated on the same data version (tag ``data_version``); ``force=True`` overrides both conditions. Every
decision is written to the challenger's version tags, so the registry itself says why the champion is what it is.

Two promotions at once must leave exactly one consistent champion. With a SQLite store (the default,
``sqlite:///…/mlflow.db``) the read-compare-set section runs under a file lock next to the database
(``<db>.promote.lock``). With a tracking server (Postgres behind it) no lock is taken: each request is
serialised by the server, which is best effort: two promotions in the very same instant may both compare against
the old champion, and the later alias write wins.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fcnseg.errors import TrackingError

CHAMPION = "champion"
CHALLENGER = "challenger"
LOCK_TIMEOUT_S = 120.0
LOCKED_RETRIES = 6  # "database is locked": another process holds SQLite's write lock; back off and retry
T = TypeVar("T")


@dataclass(frozen=True)
class PromotionDecision:
    """What ``promote`` decided, and why; ``summary()`` is the one line shown to the user."""

    promoted: bool
    reason: str
    name: str
    version: int
    previous_champion: int | None
    challenger_iou: float | None
    champion_iou: float | None
    decision: str = ""  # promoted | kept | refused | already_champion

    def summary(self) -> str:
        return self.reason


# --- store access -------------------------------------------------------------------------------------------


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///…`` URI (relative or absolute); None for other stores or in-memory."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


def client_for(tracking_uri: str) -> mlflow.MlflowClient:
    """A client whose tracking and registry stores are both ``tracking_uri`` (also made MLflow's default)."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow database at {db}; train a model first (it creates the store) or pass "
                            f"--tracking-uri / set MLFLOW_TRACKING_URI to the store that holds your runs")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _registry_uri(client: mlflow.MlflowClient) -> str:
    return getattr(client, "_registry_uri", None) or client.tracking_uri


def _is_locked_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if "database is locked" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Calls the store, retrying with exponential backoff while SQLite reports 'database is locked'."""
    delay = 0.2
    for attempt in range(LOCKED_RETRIES + 1):
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # MLflow wraps the sqlite3/SQLAlchemy error in an MlflowException
            if attempt == LOCKED_RETRIES or not _is_locked_error(exc):
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _registry_lock(client: mlflow.MlflowClient) -> Iterator[None]:
    """Serialises read-compare-set sections across processes when the registry is a SQLite file."""
    db = sqlite_path(_registry_uri(client))
    if db is None:  # a tracking server serialises requests itself (best effort, see module docstring)
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
def _as_tracking_error(action: str, client: mlflow.MlflowClient) -> Iterator[None]:
    try:
        yield
    except MlflowException as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrackingError(f"cannot {action} in {_registry_uri(client)}: {first_line}") from exc


@contextlib.contextmanager
def _default_uris(client: mlflow.MlflowClient) -> Iterator[None]:
    """``mlflow.register_model`` uses MLflow's default store: point it at the client's for the call."""
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(_registry_uri(client))
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


# --- register -----------------------------------------------------------------------------------------------


def register_model(model_uri: str, name: str, *, val_mean_iou: float | None, data_version: str | None,
                   client: mlflow.MlflowClient, tags: dict[str, Any] | None = None) -> ModelVersion:
    """Registers a logged model (``models:/m-…`` or ``runs:/<run>/model``) as a new version of ``name``.

    The version is tagged with its validation mean IoU and data version (what promotion compares) plus
    ``tags``, and gets the ``challenger`` alias. Without a measured IoU (imported weights) the tag is left
    off, so promotion refuses to compare it until one is set or ``--force`` is given.
    """
    version_tags = {k: str(v) for k, v in (tags or {}).items()}
    if val_mean_iou is not None:
        version_tags["val_mean_iou"] = repr(float(val_mean_iou))
    if data_version is not None:
        version_tags["data_version"] = str(data_version)
    with _as_tracking_error(f"register {model_uri} as {name}", client), _registry_lock(client):
        with _default_uris(client):  # it also resolves runs:/ URIs to the logged model, as MLflow 3 does
            version = _retry(mlflow.register_model, model_uri, name, tags=version_tags)
        _retry(client.set_registered_model_alias, name, CHALLENGER, version.version)
        return _retry(client.get_model_version, name, version.version)


# --- promote ------------------------------------------------------------------------------------------------


def _parse_version(name: str, version: int | str) -> int:
    try:
        number = int(version)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise TrackingError(f"model version must be a positive integer, got {version!r} for {name}; "
                            f"list versions with `fcnseg models {name}`")
    return number


def _get_version(client: mlflow.MlflowClient, name: str, version: int) -> ModelVersion:
    try:
        return _retry(client.get_model_version, name, str(version))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    known = _retry(client.search_registered_models, filter_string=f"name = '{name}'")
    where = _registry_uri(client)
    if not known:
        raise TrackingError(f"no registered model named {name!r} in {where}; register one with the pipeline "
                            f"(dvc repro) or check --tracking-uri")
    raise TrackingError(f"{name} has no version {version} in {where}; list versions with `fcnseg models {name}`")


def _champion_version(client: mlflow.MlflowClient, name: str) -> int | None:
    aliases = _retry(client.get_registered_model, name).aliases or {}
    return int(aliases[CHAMPION]) if CHAMPION in aliases else None


def _iou(version: ModelVersion) -> float | None:
    value = (version.tags or {}).get("val_mean_iou")
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _data(version: ModelVersion) -> str | None:
    return (version.tags or {}).get("data_version") or None


def _fmt_iou(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_data(value: str | None) -> str:
    return "unknown" if value is None else value[:12]


def _decide(name: str, version: int, challenger: ModelVersion, champion: ModelVersion | None,
            force: bool) -> PromotionDecision:
    """The gate: no champion, or strictly better on the same data version; ``force`` overrides."""
    new_iou, new_data = _iou(challenger), _data(challenger)
    old_number = int(champion.version) if champion is not None else None
    old_iou = _iou(champion) if champion is not None else None
    old_data = _data(champion) if champion is not None else None
    make = lambda promoted, decision, reason: PromotionDecision(  # noqa: E731
        promoted, reason, name, version, old_number, new_iou, old_iou, decision)

    if old_number == version:
        return make(False, "already_champion",
                    f"{name} v{version} is already champion (val mIoU {_fmt_iou(new_iou)})")
    if force:
        versus = "no previous champion" if champion is None else (
            f"val mIoU {_fmt_iou(new_iou)} vs {_fmt_iou(old_iou)} (v{old_number}), "
            f"data {_fmt_data(new_data)} vs {_fmt_data(old_data)}")
        return make(True, "promoted", f"promoted {name} v{version} to champion (forced): {versus}")
    if new_iou is None:
        raise TrackingError(f"{name} v{version} has no val_mean_iou tag, so it cannot be compared; set the tag "
                            f"(MLflow UI or client.set_model_version_tag) or promote anyway with --force")
    if champion is None:
        return make(True, "promoted", f"promoted {name} v{version} to champion: no champion yet "
                                      f"(val mIoU {_fmt_iou(new_iou)} on data {_fmt_data(new_data)})")
    if new_data is None or new_data != old_data:
        return make(False, "refused", f"refused: v{version} was evaluated on data {_fmt_data(new_data)}, "
                                      f"champion v{old_number} on data {_fmt_data(old_data)}; "
                                      f"use --force to promote anyway")
    if old_iou is None:
        raise TrackingError(f"champion {name} v{old_number} has no val_mean_iou tag, so v{version} cannot be "
                            f"compared with it; set the tag or promote anyway with --force")
    if new_iou > old_iou:
        return make(True, "promoted", f"promoted {name} v{version} to champion: val mIoU {new_iou:.4f} > "
                                      f"{old_iou:.4f} (v{old_number}) on data {_fmt_data(new_data)}")
    return make(False, "kept", f"kept champion v{old_number}: challenger v{version} val mIoU "
                               f"{new_iou:.4f} <= {old_iou:.4f}")


def _record(client: mlflow.MlflowClient, decision: PromotionDecision) -> None:
    tags = {
        "promotion_decision": decision.decision,
        "promotion_reason": decision.reason,
        "compared_to_version": "none" if decision.previous_champion is None else str(decision.previous_champion),
        "champion_val_mean_iou": "none" if decision.champion_iou is None else repr(decision.champion_iou),
        "challenger_val_mean_iou": "none" if decision.challenger_iou is None else repr(decision.challenger_iou),
        "promotion_timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in tags.items():
        _retry(client.set_model_version_tag, decision.name, str(decision.version), key, value)


def promote(name: str, version: int | str, *, force: bool = False,
            client: mlflow.MlflowClient) -> PromotionDecision:
    """Moves the ``champion`` alias to ``version`` if it beats the champion on the same data (or ``force``).

    The decision and both figures are recorded as tags of ``version``. Read, compare and move happen under one
    lock, so concurrent promotions leave one consistent champion.
    """
    number = _parse_version(name, version)
    with _as_tracking_error(f"promote {name} v{number}", client), _registry_lock(client):
        challenger = _get_version(client, name, number)
        champion_number = _champion_version(client, name)
        champion = None if champion_number is None else _get_version(client, name, champion_number)
        decision = _decide(name, number, challenger, champion, force)
        if decision.decision == "already_champion":
            return decision  # nothing changed; keep the record of the promotion that made it champion
        if decision.promoted:
            _retry(client.set_registered_model_alias, name, CHAMPION, str(number))
        _record(client, decision)
        return decision


# --- list ---------------------------------------------------------------------------------------------------


def list_versions(name: str, *, client: mlflow.MlflowClient) -> list[dict[str, Any]]:
    """Every version of ``name``: version, aliases, val_mean_iou, data_version, run_id, creation_timestamp."""
    with _as_tracking_error(f"list versions of {name}", client):
        if not _retry(client.search_registered_models, filter_string=f"name = '{name}'"):
            raise TrackingError(f"no registered model named {name!r} in {_registry_uri(client)}; register one "
                                f"with the pipeline (dvc repro) or check --tracking-uri")
        versions = _retry(client.search_model_versions, f"name = '{name}'")
        aliases = _retry(client.get_registered_model, name).aliases or {}
    by_version: dict[int, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(int(number), []).append(alias)
    rows = [{
        "version": int(v.version),
        "aliases": sorted(by_version.get(int(v.version), [])),
        "val_mean_iou": _iou(v),
        "data_version": _data(v),
        "run_id": v.run_id,
        "creation_timestamp": v.creation_timestamp,
    } for v in versions]
    return sorted(rows, key=lambda row: row["version"])
