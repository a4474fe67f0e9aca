"""Registration and listing: a logged model becomes a version of a registered model (alias ``challenger``, the tags
promotion compares, its lineage and model card), and the versions of a model are listed with what they were
scored on and where they came from."""

from __future__ import annotations

import json
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fcnseg.errors import TrackingError
from fcnseg.lineage import DVC_LOCK_PREFIX, EXP_BASELINE, EXP_NAME, GIT_COMMIT, GIT_DIRTY
from fcnseg.model_card import publish_model_card
from fcnseg.registry.gate import mean_iou
from fcnseg.registry.locks import registry_lock
from fcnseg.registry.store import as_tracking_error, retry, store_uri
from fcnseg.runs import using_store

CHALLENGER = "challenger"
LINEAGE_RUN_TAGS = (GIT_COMMIT, GIT_DIRTY, "mlflow.source.git.commit", EXP_NAME, EXP_BASELINE)


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
    with as_tracking_error(f"register {model_uri} as {name}", client):
        version_tags = {**dataset_tags(model_uri, client), **version_tags}
    with as_tracking_error(f"register {model_uri} as {name}", client), registry_lock(client, name):
        with using_store(store_uri(client)):  # it also resolves runs:/ URIs to the logged model, as MLflow 3 does
            version = retry(mlflow.register_model, model_uri, name, tags=version_tags)
        retry(client.set_registered_model_alias, name, CHALLENGER, version.version)
        if version.run_id:
            _copy_run_lineage(client, name, version, lineage or {})
        version = retry(client.get_model_version, name, version.version)
    if model_card:
        with as_tracking_error(f"write the model card of {name} v{version.version}", client):
            publish_model_card(client, version)
        version = retry(client.get_model_version, name, version.version)
    return version


def dataset_tags(model_uri: str, client: mlflow.MlflowClient) -> dict[str, str]:
    """The classes a logged model predicts, from its MLmodel metadata (``metadata.dataset``, written by
    :func:`fcnseg.serving.log_pyfunc_model`), as version tags: ``dataset``, ``num_classes``, ``class_names`` (JSON).
    {} for a model without that metadata (logged by older code)."""
    from mlflow.models import get_model_info

    with using_store(store_uri(client)):
        metadata = (retry(get_model_info, model_uri).metadata or {}).get("dataset") or {}
    if not metadata.get("class_names"):
        return {}
    names = [str(n) for n in metadata["class_names"]]
    return {"dataset": str(metadata.get("name", "unnamed")), "num_classes": str(len(names)),
            "class_names": json.dumps(names)}


def registered_as(client: mlflow.MlflowClient, name: str, model_uri: str) -> ModelVersion | None:
    """The version of ``name`` whose source is ``model_uri``, if it was registered already; else None (the DVC
    register stage registers a training run's model once, however often it re-runs)."""
    if not retry(client.search_registered_models, filter_string=f"name = '{name}'"):
        return None
    found = [v for v in retry(client.search_model_versions, f"name = '{name}'") if v.source == model_uri]
    return min(found, key=lambda v: int(v.version)) if found else None


def _copy_run_lineage(client: mlflow.MlflowClient, name: str, version: ModelVersion, lineage: dict[str, str]) -> None:
    """The run's git commit/dirty flag onto the version; ``lineage`` (known at registration) onto the run."""
    run = retry(client.get_run, version.run_id)
    for key in LINEAGE_RUN_TAGS:
        if key in run.data.tags and key not in (version.tags or {}):
            retry(client.set_model_version_tag, name, version.version, key, run.data.tags[key])
    for key, value in lineage.items():
        retry(client.set_tag, version.run_id, key, str(value))


def list_versions(name: str, *, client: mlflow.MlflowClient) -> list[dict[str, Any]]:
    """Every version of ``name``: version, aliases, val_mean_iou, data_version, run_id, creation_timestamp."""
    with as_tracking_error(f"list versions of {name}", client):
        if not retry(client.search_registered_models, filter_string=f"name = '{name}'"):
            raise TrackingError(f"no registered model named {name!r} in {store_uri(client)}; register one "
                                f"with the pipeline (dvc repro) or check --tracking-uri")
        versions = retry(client.search_model_versions, f"name = '{name}'")
        aliases = retry(client.get_registered_model, name).aliases or {}
    by_version: dict[int, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(int(number), []).append(alias)
    rows = []
    for v in versions:
        tags = v.tags or {}
        rows.append({
            "version": int(v.version),
            "aliases": sorted(by_version.get(int(v.version), [])),
            "val_mean_iou": mean_iou(tags),
            "dataset": tags.get("dataset"),
            "num_classes": int(tags["num_classes"]) if str(tags.get("num_classes", "")).isdigit() else None,
            "data_version": tags.get("data_version") or None,
            "eval_split": tags.get("eval_split"),
            "eval_ids_sha256": tags.get("eval_ids_sha256"),
            "git_commit": tags.get(GIT_COMMIT) or tags.get("mlflow.source.git.commit"),
            "git_dirty": tags.get(GIT_DIRTY),
            "dvc_lock": {k[len(DVC_LOCK_PREFIX):]: t for k, t in tags.items() if k.startswith(DVC_LOCK_PREFIX)},
            "datasets": _datasets(client, v.run_id),
            "run_id": v.run_id,
            "creation_timestamp": v.creation_timestamp,
        })
    return sorted(rows, key=lambda row: row["version"])


def _datasets(client: mlflow.MlflowClient, run_id: str | None) -> list[str]:
    """The run's logged datasets as ``context name source (MD5 …)`` lines ([] when the run is gone)."""
    if not run_id:
        return []
    try:
        run = retry(client.get_run, run_id)
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
