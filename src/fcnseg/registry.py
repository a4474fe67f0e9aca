"""MLflow model registry: register a version (alias ``challenger``), promote it (alias ``champion``), list versions.

Promotion is gated: the ``champion`` alias moves to a version only when there is no champion yet, or when
- both were scored on the identical evaluation set: same data version, split name and sha256 of the split's sorted
  image ids (tags ``data_version``, ``eval_split``, ``eval_ids_sha256``; see :mod:`fcnseg.lineage`),
- the version's mean IoU (tag ``val_mean_iou``) is strictly higher than the champion's, and
- no class's IoU (tag ``per_class_iou``) drops by more than ``per_class_margin`` (default 0.05 = 5 points).
``force=True`` overrides all three and is recorded (tag ``promotion_forced``). Every decision, with the per-class
deltas (tags ``iou_delta.<class>``), is written to the challenger's version tags, so the registry itself says why
the champion is what it is.

Two promotions at once must leave exactly one consistent champion: the read-compare-set section runs under a
lock. With a SQLite store (the default, ``sqlite:///…/mlflow.db``) it is a file lock next to the database
(``<db>.promote.lock``). With a tracking server, MLflow has no compare-and-set on aliases, so the lock lives in
the registry: the registered model ``<name>.promotion-lock``, whose creation is atomic on the server's database
(one creator wins, the others wait; a lock left by a dead process is broken after ``LOCK_STALE_S``). After
moving the alias, the promotion reads it back and fails loudly if it is not what it set.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fcnseg.errors import TrackingError, one_line
from fcnseg.lineage import DVC_LOCK_PREFIX, EVAL_KEYS, GIT_COMMIT, GIT_DIRTY
from fcnseg.model_card import publish_model_card
from fcnseg.runs import auth_problem, using_store

CHAMPION = "champion"
CHALLENGER = "challenger"
LOCK_TIMEOUT_S = 120.0
LOCK_STALE_S = 600.0  # a server-side lock older than this is left over by a dead process
LOCK_SUFFIX = ".promotion-lock"
LOCKED_RETRIES = 6  # "database is locked": another process holds SQLite's write lock; back off and retry
PER_CLASS_MARGIN = 0.05  # no promotion when any class's IoU drops by more than this (IoU in [0, 1])
DELTA_PREFIX = "iou_delta."
LINEAGE_RUN_TAGS = (GIT_COMMIT, GIT_DIRTY, "mlflow.source.git.commit")
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
    per_class_delta: dict[str, float] | None = None  # challenger − champion, classes scored by both
    forced: bool = False

    def summary(self) -> str:
        return self.reason

    def report(self) -> str:
        """The summary line, then the per-class IoU deltas (when the champion was compared class by class)."""
        if not self.per_class_delta:
            return self.reason
        return (f"{self.reason}\nper-class IoU change, v{self.version} - v{self.previous_champion}:\n"
                f"{self.delta_table()}")

    def delta_table(self) -> str:
        """Per-class IoU deltas, one class a line (empty when nothing was compared)."""
        if not self.per_class_delta:
            return ""
        width = max(len(name) for name in self.per_class_delta)
        return "\n".join(f"  {name:<{width}}  {delta:+.4f}" for name, delta in self.per_class_delta.items())


# --- store access -------------------------------------------------------------------------------------------


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///…`` URI (relative or absolute); None for other stores or in-memory."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


def client_for(tracking_uri: str) -> mlflow.MlflowClient:
    """A client whose tracking and registry stores are both ``tracking_uri``."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow database at {db}; train a model first (it creates the store) or pass "
                            f"--tracking-uri / set MLFLOW_TRACKING_URI to the store that holds your runs")
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
def _registry_lock(client: mlflow.MlflowClient, name: str) -> Iterator[None]:
    """Serialises read-compare-set sections on model ``name`` across processes and machines.

    SQLite store: a file lock next to the database. Any other store (a tracking server): a lock held in the
    registry itself, see :func:`_server_lock`.
    """
    db = sqlite_path(_registry_uri(client))
    if db is None:
        with _server_lock(client, name):
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
def _server_lock(client: mlflow.MlflowClient, name: str) -> Iterator[None]:
    """A lock any MLflow registry can hold: the registered model ``<name>.promotion-lock``.

    Creating a registered model is atomic on every store (its name is the table's primary key): of concurrent
    creators exactly one succeeds, the others get RESOURCE_ALREADY_EXISTS and retry until it is deleted. A lock
    older than ``LOCK_STALE_S`` (its holder died) is broken.
    """
    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            _retry(client.create_registered_model, lock, tags={"holder": holder, "acquired": repr(time.time())},
                   description="fcnseg promotion lock: held while a promotion runs; delete it if none is running")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = _retry(client.get_registered_model, lock)
            if time.time() - float((held.tags or {}).get("acquired", "inf")) > LOCK_STALE_S:
                _retry(client.delete_registered_model, lock)  # its holder died; the next create wins
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
            _retry(client.delete_registered_model, lock)


@contextlib.contextmanager
def _as_tracking_error(action: str, client: mlflow.MlflowClient) -> Iterator[None]:
    try:
        yield
    except MlflowException as exc:
        auth = auth_problem(exc, action, _registry_uri(client))
        if auth:
            raise TrackingError(auth) from exc
        raise TrackingError(f"cannot {action} in {_registry_uri(client)}: {one_line(exc)}") from exc


# --- register -----------------------------------------------------------------------------------------------


def register_model(model_uri: str, name: str, *, val_mean_iou: float | None, data_version: str | None,
                   client: mlflow.MlflowClient, tags: dict[str, Any] | None = None,
                   evaluation: dict[str, str] | None = None, per_class_iou: dict[str, float | None] | None = None,
                   lineage: dict[str, str] | None = None, model_card: bool = True) -> ModelVersion:
    """Registers a logged model (``models:/m-…`` or ``runs:/<run>/model``) as a new version of ``name``.

    The version is tagged with what promotion compares: its mean IoU, its evaluation set (``evaluation``, from
    :func:`fcnseg.lineage.evaluation_set`: data version, split, image-id hash; ``data_version`` alone when not
    given) and ``per_class_iou``; with the lineage of the run that logged it (git commit and dirty flag) plus
    ``lineage`` (e.g. ``dvc.lock`` hashes, also set on the run); and ``tags``. It gets the ``challenger`` alias and
    a model card (description + run artifact). Without a measured IoU (imported weights) the tag is left off,
    so promotion refuses to compare it until one is set or ``--force`` is given.
    """
    version_tags = {k: str(v) for k, v in (tags or {}).items()}
    if val_mean_iou is not None:
        version_tags["val_mean_iou"] = repr(float(val_mean_iou))
    if data_version is not None:
        version_tags["data_version"] = str(data_version)
    version_tags.update({k: str(v) for k, v in (evaluation or {}).items()})
    if per_class_iou is not None:
        version_tags["per_class_iou"] = json.dumps(
            {k: (None if v is None or v != v else round(float(v), 6)) for k, v in per_class_iou.items()})
    version_tags.update({k: str(v) for k, v in (lineage or {}).items()})
    with _as_tracking_error(f"register {model_uri} as {name}", client), _registry_lock(client, name):
        with using_store(_registry_uri(client)):  # it also resolves runs:/ URIs to the logged model, as MLflow 3 does
            version = _retry(mlflow.register_model, model_uri, name, tags=version_tags)
        _retry(client.set_registered_model_alias, name, CHALLENGER, version.version)
        if version.run_id:
            _copy_run_lineage(client, name, version, lineage or {})
        version = _retry(client.get_model_version, name, version.version)
    if model_card:
        with _as_tracking_error(f"write the model card of {name} v{version.version}", client):
            publish_model_card(client, version)
        version = _retry(client.get_model_version, name, version.version)
    return version


def _copy_run_lineage(client: mlflow.MlflowClient, name: str, version: ModelVersion, lineage: dict[str, str]) -> None:
    """The run's git commit/dirty flag onto the version; ``lineage`` (known at registration) onto the run."""
    run = _retry(client.get_run, version.run_id)
    for key in LINEAGE_RUN_TAGS:
        if key in run.data.tags and key not in (version.tags or {}):
            _retry(client.set_model_version_tag, name, version.version, key, run.data.tags[key])
    for key, value in lineage.items():
        _retry(client.set_tag, version.run_id, key, str(value))


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


def _evaluation_set(version: ModelVersion) -> tuple[str | None, ...]:
    tags = version.tags or {}
    return tuple(tags.get(key) or None for key in EVAL_KEYS)


def _fmt_set(value: tuple[str | None, ...]) -> str:
    data, split, ids = value
    if split is None or ids is None:
        return f"data {_fmt_data(data)}, split unknown"
    return f"data {_fmt_data(data)}, split {split} (ids {ids[:12]})"


def _per_class(version: ModelVersion) -> dict[str, float] | None:
    try:
        table = json.loads((version.tags or {}).get("per_class_iou") or "null")
    except ValueError:
        return None
    if not isinstance(table, dict):
        return None
    return {str(k): float(v) for k, v in table.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def per_class_deltas(challenger: ModelVersion, champion: ModelVersion) -> dict[str, float] | None:
    """Challenger − champion IoU for every class both scored; None when either lacks per-class IoU."""
    new, old = _per_class(challenger), _per_class(champion)
    if new is None or old is None:
        return None
    return {cls: round(new[cls] - old[cls], 6) for cls in new if cls in old}


def _decide(name: str, version: int, challenger: ModelVersion, champion: ModelVersion | None,
            force: bool, per_class_margin: float = PER_CLASS_MARGIN) -> PromotionDecision:
    """The gate: no champion, or on the identical evaluation set strictly better in mean IoU with no class
    dropping by more than ``per_class_margin``; ``force`` overrides."""
    new_iou, new_set = _iou(challenger), _evaluation_set(challenger)
    old_number = int(champion.version) if champion is not None else None
    old_iou = _iou(champion) if champion is not None else None
    old_set = _evaluation_set(champion) if champion is not None else (None, None, None)
    same_set = champion is not None and None not in new_set and new_set == old_set
    deltas = per_class_deltas(challenger, champion) if same_set else None  # only like with like
    make = lambda promoted, decision, reason: PromotionDecision(  # noqa: E731
        promoted, reason, name, version, old_number, new_iou, old_iou, decision, deltas, force and promoted)

    if old_number == version:
        return make(False, "already_champion",
                    f"{name} v{version} is already champion (val mIoU {_fmt_iou(new_iou)})")
    if force:
        versus = "no previous champion" if champion is None else (
            f"val mIoU {_fmt_iou(new_iou)} vs {_fmt_iou(old_iou)} (v{old_number}), "
            f"{_fmt_set(new_set)} vs {_fmt_set(old_set)}")
        return make(True, "promoted", f"promoted {name} v{version} to champion (forced): {versus}")
    if new_iou is None:
        raise TrackingError(f"{name} v{version} has no val_mean_iou tag, so it cannot be compared; set the tag "
                            f"(MLflow UI or client.set_model_version_tag) or promote anyway with --force")
    if champion is None:
        return make(True, "promoted", f"promoted {name} v{version} to champion: no champion yet "
                                      f"(val mIoU {_fmt_iou(new_iou)} on {_fmt_set(new_set)})")
    if not same_set:
        return make(False, "refused", f"refused: v{version} was evaluated on {_fmt_set(new_set)}, "
                                      f"champion v{old_number} on {_fmt_set(old_set)}; not the same evaluation "
                                      f"set, use --force to promote anyway")
    if old_iou is None:
        raise TrackingError(f"champion {name} v{old_number} has no val_mean_iou tag, so v{version} cannot be "
                            f"compared with it; set the tag or promote anyway with --force")
    if new_iou <= old_iou:
        return make(False, "kept", f"kept champion v{old_number}: challenger v{version} val mIoU "
                                   f"{new_iou:.4f} <= {old_iou:.4f}")
    if deltas is None:
        return make(False, "refused", f"refused: val mIoU {new_iou:.4f} > {old_iou:.4f} (v{old_number}), but "
                                      f"{'v' + str(version) if _per_class(challenger) is None else 'the champion'} "
                                      f"has no per_class_iou tag, so the per-class guard cannot run; "
                                      f"use --force to promote anyway")
    drops = {cls: d for cls, d in deltas.items() if d < -per_class_margin}
    if drops:
        worst = ", ".join(f"{cls} {d:+.4f}" for cls, d in sorted(drops.items(), key=lambda item: item[1]))
        return make(False, "refused", f"refused: val mIoU {new_iou:.4f} > {old_iou:.4f} (v{old_number}), but IoU "
                                      f"drops by more than {per_class_margin:.4f} for {worst}; "
                                      f"use --force to promote anyway")
    return make(True, "promoted", f"promoted {name} v{version} to champion: val mIoU {new_iou:.4f} > "
                                  f"{old_iou:.4f} (v{old_number}) on {_fmt_set(new_set)}, no class drops by "
                                  f"more than {per_class_margin:.4f}")


def _record(client: mlflow.MlflowClient, decision: PromotionDecision, per_class_margin: float) -> None:
    tags = {
        "promotion_decision": decision.decision,
        "promotion_reason": decision.reason,
        "compared_to_version": "none" if decision.previous_champion is None else str(decision.previous_champion),
        "champion_val_mean_iou": "none" if decision.champion_iou is None else repr(decision.champion_iou),
        "challenger_val_mean_iou": "none" if decision.challenger_iou is None else repr(decision.challenger_iou),
        "promotion_timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "promotion_forced": str(decision.forced).lower(),
        "per_class_margin": repr(per_class_margin),
    }
    tags.update({DELTA_PREFIX + re.sub(r"[^\w\-. /]", "_", cls): f"{delta:+.6f}"
                 for cls, delta in (decision.per_class_delta or {}).items()})
    for key, value in tags.items():
        _retry(client.set_model_version_tag, decision.name, str(decision.version), key, value)


def promote(name: str, version: int | str, *, force: bool = False, client: mlflow.MlflowClient,
            per_class_margin: float = PER_CLASS_MARGIN) -> PromotionDecision:
    """Moves the ``champion`` alias to ``version`` if it beats the champion on the identical evaluation set
    without any class dropping by more than ``per_class_margin`` (or ``force``).

    The decision, both figures and the per-class deltas are recorded as tags of ``version``. Read, compare and
    move happen under one lock, so concurrent promotions leave one consistent champion.
    """
    number = _parse_version(name, version)
    if not 0.0 <= float(per_class_margin) <= 1.0:
        raise TrackingError(f"per-class margin must be an IoU difference in [0, 1] (0.05 = 5 points), "
                            f"got {per_class_margin}")
    with _as_tracking_error(f"promote {name} v{number}", client), _registry_lock(client, name):
        challenger = _get_version(client, name, number)
        champion_number = _champion_version(client, name)
        champion = None if champion_number is None else _get_version(client, name, champion_number)
        decision = _decide(name, number, challenger, champion, force, per_class_margin)
        if decision.decision == "already_champion":
            return decision  # nothing changed; keep the record of the promotion that made it champion
        if decision.promoted:
            _retry(client.set_registered_model_alias, name, CHAMPION, str(number))
            if _champion_version(client, name) != number:  # re-check: someone bypassing the lock moved it
                raise TrackingError(f"champion of {name} changed while v{number} was being promoted (a promotion "
                                    f"outside fcnseg?); run `fcnseg models {name}` and promote again")
        _record(client, decision, per_class_margin)
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
        "eval_split": (v.tags or {}).get("eval_split"),
        "eval_ids_sha256": (v.tags or {}).get("eval_ids_sha256"),
        "git_commit": (v.tags or {}).get(GIT_COMMIT) or (v.tags or {}).get("mlflow.source.git.commit"),
        "git_dirty": (v.tags or {}).get(GIT_DIRTY),
        "dvc_lock": {k[len(DVC_LOCK_PREFIX):]: t for k, t in (v.tags or {}).items() if k.startswith(DVC_LOCK_PREFIX)},
        "datasets": _datasets(client, v.run_id),
        "run_id": v.run_id,
        "creation_timestamp": v.creation_timestamp,
    } for v in versions]
    return sorted(rows, key=lambda row: row["version"])


def _datasets(client: mlflow.MlflowClient, run_id: str | None) -> list[str]:
    """The run's logged datasets as ``context name source (MD5 …)`` lines ([] when the run is gone)."""
    if not run_id:
        return []
    try:
        run = _retry(client.get_run, run_id)
    except MlflowException:
        return []
    lines = []
    for dataset_input in (run.inputs.dataset_inputs if run.inputs else []):
        tags = {t.key: t.value for t in dataset_input.tags}
        try:
            source = json.loads(dataset_input.dataset.source or "{}").get("url", "")
        except ValueError:
            source = dataset_input.dataset.source
        lines.append(f"{tags.get('mlflow.data.context', 'input')}: {dataset_input.dataset.name} from {source}"
                     + (f" (MD5 {tags['md5']})" if tags.get("md5") else ""))
    return lines
