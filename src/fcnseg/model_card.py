"""A model card per registered version: data and split, metrics and per-class IoU, recipe, lineage, intended use
and limits. Written as the version's description (what the registry UI shows), as the description of the run
that logged the model, and as a markdown artifact of that run (``model_card/<name>-v<version>.md``)."""

from __future__ import annotations

import json
from typing import Any

from mlflow.entities.model_registry import ModelVersion

from fcnseg.data.classes import VOC_CLASSES

DESCRIPTION_LIMIT = 5000  # MLflow stores up to 5000 characters of a version description
RECIPE_PARAMS = (
    "model.name", "model.net.name", "model.net.width", "model.normalization", "model.init_from",
    "model.finetune_from",
    "optim.optimizer._target_", "optim.optimizer.lr", "optim.lr", "optim.optimizer.momentum",
    "optim.optimizer.weight_decay", "trainer.max_epochs", "trainer.precision", "data.name",
    "data.datamodule.train_split", "data.datamodule.val_split", "data.datamodule.batch_size",
    "data.datamodule.train_transform.crop_size", "seed",
)


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "n/a"
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


def render(name: str, version: ModelVersion, run: Any | None) -> str:
    """The card's markdown from the version's tags and its run's params, metrics and dataset inputs."""
    tags = version.tags or {}
    params = run.data.params if run is not None else {}
    metrics = run.data.metrics if run is not None else {}
    classes = _class_names(tags)
    dataset = tags.get("dataset") or params.get("data.name") or ("voc2012" if classes == list(VOC_CLASSES) else "?")
    lines = [f"# {name} v{version.version}", ""]
    lines += ["## Data and evaluation set", "",
              f"- dataset: `{dataset}`, {len(classes)} classes: {_list(classes)}",
              f"- data version: `{tags.get('data_version', 'unknown')}`",
              f"- evaluation split: `{tags.get('eval_split', 'unknown')}` "
              f"({tags.get('eval_num_images', '?')} images, ids sha256 `{tags.get('eval_ids_sha256', 'unknown')}`)"]
    for dataset_input in (run.inputs.dataset_inputs if run is not None and run.inputs else []):
        input_tags = {t.key: t.value for t in dataset_input.tags}
        source = json.loads(dataset_input.dataset.source or "{}").get("url", "") if dataset_input.dataset.source else ""
        lines.append(f"- {input_tags.get('mlflow.data.context', 'input')}: `{dataset_input.dataset.name}` from "
                     f"{source or 'n/a'} (MD5 `{input_tags.get('md5') or 'n/a'}`)")
    lines += ["", "## Metrics", "", f"- mean IoU (evaluation split): {_fmt(tags.get('val_mean_iou'))}"]
    for key in ("pixel_acc", "mean_acc", "fw_iou"):
        value = metrics.get(f"eval_best/{key}", metrics.get(f"val_best/{key}"))
        if value is not None:
            lines.append(f"- {key}: {_fmt(value)}")
    per_class = json.loads(tags.get("per_class_iou") or "null") or {}
    if per_class:
        lines += ["", "| class | IoU |", "|---|---|"] + [f"| {cls} | {_fmt(iou)} |" for cls, iou in per_class.items()]
    recipe = [(key, params[key]) for key in RECIPE_PARAMS if params.get(key) not in (None, "", "None")]
    lines += ["", "## Recipe", ""] + ([f"- `{key}` = `{value}`" for key, value in recipe] or ["- not recorded"])
    dvc = {k.removeprefix("dvc_lock."): v for k, v in tags.items() if k.startswith("dvc_lock.")}
    commit = tags.get("git_commit") or tags.get("mlflow.source.git.commit")
    lines += ["", "## Lineage", "",
              f"- git commit: `{commit or 'unknown'}`" + (" (working tree was dirty: not exactly reproducible)"
                                                         if tags.get("git_dirty") == "true" else ""),
              f"- MLflow run: `{version.run_id}`"]
    lines += [f"- dvc.lock `{stage}`: `{value}`" for stage, value in sorted(dvc.items())]
    lines += [f"- rebuild: `fcnseg reproduce models:/{name}/{version.version}`"]
    if tags.get("source_weights"):
        lines.append(f"- imported weights: `{tags['source_weights']}`")
    lines += ["", "## Intended use and limits", ""] + _intended_use(dataset, classes)
    return "\n".join(lines) + "\n"


def _class_names(tags: dict[str, str]) -> list[str]:
    """The version's classes (``class_names`` tag, from the model's metadata); a version registered before it
    was recorded is a VOC model (its per-class IoU names them otherwise)."""
    try:
        names = json.loads(tags.get("class_names") or "null")
    except ValueError:
        names = None
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    per_class = json.loads(tags.get("per_class_iou") or "null") or {}
    return list(per_class) if per_class else list(VOC_CLASSES)


def _list(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _intended_use(dataset: str, classes: list[str]) -> list[str]:
    """The card's use and limits: VOC's wording for a VOC model, the dataset's own classes for any other."""
    if classes == list(VOC_CLASSES):
        lines = ["- Semantic segmentation into the 21 PASCAL VOC classes (20 objects + background) of natural RGB "
                 "photos like VOC's; every pixel gets one class, 'void' is never predicted.",
                 "- Scores hold for the evaluation split above only; other domains (medical, aerial, drawings, "
                 "night, heavy blur) and objects outside the 20 classes are not measured and will be mislabelled, "
                 "most often as background or a visually similar class.",
                 "- Not for decisions about people (person is one class; no identity, no fairness evaluation)."]
    else:
        lines = [f"- Semantic segmentation into the {len(classes)} classes of dataset `{dataset}` "
                 f"({_list(classes, 12)}) of images like that dataset's; every pixel gets one class, the ignore "
                 "label is never predicted.",
                 f"- Scores hold for the evaluation split above only; other domains and anything outside these "
                 f"{len(classes)} classes are not measured and will be mislabelled as a visually similar class."]
    if dataset == "synthetic":
        lines.append("- Synthetic-data models (data `synthetic`) only show that the pipeline works; they do not "
                     "segment photos.")
    return lines


def publish_model_card(client, version: ModelVersion) -> str:
    """Renders the card, logs it to the version's run and sets it as the version's description."""
    run = client.get_run(version.run_id) if version.run_id else None
    card = render(version.name, version, run)
    if run is not None:
        client.log_text(version.run_id, card, f"model_card/{version.name}-v{version.version}.md")
        client.set_tag(version.run_id, "mlflow.note.content", card[:DESCRIPTION_LIMIT])  # the run's description
    description = card if len(card) <= DESCRIPTION_LIMIT else (
        card[: DESCRIPTION_LIMIT - 120].rsplit("\n", 1)[0]
        + f"\n\n(cut; full card: run artifact model_card/{version.name}-v{version.version}.md)\n")
    client.update_model_version(version.name, version.version, description=description)
    return card
