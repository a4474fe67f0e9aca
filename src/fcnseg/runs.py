"""Where runs live: the project root, the MLflow store a command talks to, and how MLflow's failures read to a
user (a training dir's files are :mod:`fcnseg.run_dir`'s). A leaf: every module that talks to MLflow stands on it, it stands on none of them.
"""

from __future__ import annotations

import contextlib
import csv
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fcnseg.errors import TrackingError



def project_root(start: Path | None = None) -> Path:
    """The project's root: the nearest directory holding dvc.yaml (or .git), outside DVC's temp experiment dirs."""
    here = (start or Path.cwd()).resolve()
    text = str(here)
    if "/.dvc/tmp/exps/" in text:  # `dvc exp run --temp/--queue` runs in a copy: track into the real project
        here = Path(text.split("/.dvc/tmp/exps/")[0])
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".git").exists():
            return candidate
    return here


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///…`` URI (relative or absolute); None for other stores or in-memory."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


@contextlib.contextmanager
def store_setup_lock(uri: str) -> Iterator[None]:
    """Serialises the first use of a SQLite store across processes (parallel sweep jobs, concurrent commands): two
    processes creating a new database's tables, or the same experiment, at once collide ("table … already
    exists"). A file lock beside the database; other stores need none."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db.with_name(db.name + ".setup.lock"))):
        yield


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The store of every command: ``explicit`` (``tracking.tracking_uri``, ``--tracking-uri``), else
    $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db (a real database, no server)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


@contextlib.contextmanager
def using_store(uri: str) -> Iterator[None]:
    """MLflow's fluent calls (``start_run``, ``log_model``, ``register_model``, ``pyfunc.load_model`` of
    ``models:/`` URIs) read a process-wide default tracking and registry store: make ``uri`` both for the block,
    then put back exactly what was there, environment included (``mlflow.set_*_uri`` export
    ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI``, which later subprocesses would inherit).

    An experiment made active before (``mlflow.set_experiment``, by the caller or a notebook) belongs to another
    store, or to nothing this block does: it is set aside for the block, else ``start_run(run_id=...)`` of a run in
    another experiment refuses ("active experiment ID does not match")."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
    saved = (tracking_state._tracking_uri, registry_state._registry_uri, fluent._active_experiment_id,
             {name: os.environ.get(name) for name in names})
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_state._tracking_uri, registry_state._registry_uri, fluent._active_experiment_id = saved[:3]
        for name, value in saved[3].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def experiment_id(client: Any, name: str) -> str:
    """The id of ``client``'s experiment ``name``, created if new (without ``mlflow.set_experiment``, which makes
    it the whole process's active experiment)."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def read_metrics_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a training dir's ``metrics.csv`` (Lightning's CSVLogger: a row per logging step, empty cells for
    metrics not logged then); [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fails within seconds, in one line, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, point MLFLOW_TRACKING_URI at a "
            f"running one, or train without tracking: tracking.enabled=false"
        ) from exc


def limit_http_retries() -> None:
    """MLflow retries an unreachable server for minutes per call by default; training must not stall on it."""
    # Also bounds how long rank 0 can stall the others of a DDP job (their collective timeout is 45 s).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def is_unreachable_error(exc: BaseException) -> bool:
    """True for an outage (no answer, connection or timeout errors, a server error, a locked database); False when
    MLflow answered and refused the call (e.g. "Changing param values is not allowed": a config conflict)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        if exc.get_http_status_code() >= 500 and "API request" in str(exc):
            return True  # the REST client's "API request to ... failed" after its retries
        return exc.error_code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR") and "Changing param" not in str(exc)
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or type(exc).__name__ in (
        "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "MaxRetryError", "OperationalError")


def auth_problem(exc: BaseException, action: str, where: str) -> str | None:
    """The one-line message for a server's authentication (401) or permission (403) refusal; None otherwise."""
    code = getattr(exc, "error_code", None)
    if code == "UNAUTHENTICATED":
        who = os.environ.get("MLFLOW_TRACKING_USERNAME")
        return (f"cannot {action}: {where} requires a login and "
                + (f"refused user {who!r}; check MLFLOW_TRACKING_PASSWORD" if who else
                   "none was given; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"))
    if code == "PERMISSION_DENIED":
        who = os.environ.get("MLFLOW_TRACKING_USERNAME", "(no user)")
        return (f"cannot {action}: user {who!r} lacks the permission on {where}; ask an MLflow admin for EDIT "
                f"(or MANAGE) on the registered model, or run as a user who has it")
    return None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_params(cfg: Any) -> dict[str, str]:
    """The resolved config flattened into MLflow params (values cut to MLflow's 500-character limit)."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True)
    return {key: ("" if value is None else str(value)[:500]) for key, value in flatten(container).items()}


# MLflow 3.17's UI opens an experiment in its GenAI view (traces: empty for us) unless the URL asks for the model
# training view; the experiment tag mlflow.experimentKind does not change that.
UI_VIEW = "workflowType=machine_learning"


def ui_links(uri: str, *, experiment_id: str | None = None, run_id: str | None = None,
             model: tuple[str, int | str] | None = None) -> list[str]:
    """MLflow UI links for a store: the experiment's runs table (where runs are compared), a run, a model version.
    A local store has no UI of its own: the links are where ``mlflow ui --backend-store-uri URI`` serves it."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    links = []
    if experiment_id is not None:
        links.append(f"runs of the experiment: {base}/#/experiments/{experiment_id}?{UI_VIEW}")
        if run_id is not None:
            links.append(f"this run: {base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}")
    if model is not None:
        links.append(f"model version: {base}/#/models/{model[0]}/versions/{model[1]}?{UI_VIEW}")
    if links and not uri.startswith(("http://", "https://")):
        links.append(f"(open with: mlflow ui --backend-store-uri {uri})")
    return links
