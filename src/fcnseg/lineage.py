"""Lineage: what a run and a registered version were made from (git tree, DVC stages, dataset, evaluation set).

Recorded as MLflow tags (runs and model versions alike) and, for the dataset, as an MLflow run input
(``mlflow.log_input``: name, source URL, MD5, split), so the UI's run page shows it and the registry can say how
to rebuild a version (``fcnseg reproduce``).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from fcnseg.data.voc import COMPLETE_MARKER, VOCSegmentation
from fcnseg.runs import project_root

GIT_COMMIT, GIT_DIRTY = "git_commit", "git_dirty"
DVC_LOCK_PREFIX = "dvc_lock."
EVAL_KEYS = ("data_version", "eval_split", "eval_ids_sha256")  # an evaluation set: all three must match
TAG_LIMIT = 5000  # MLflow's limit on a tag value


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(root: str | Path) -> dict[str, str]:
    """``git_commit`` (HEAD) and ``git_dirty`` ("true" when tracked files differ from HEAD); {} outside git."""
    root = Path(root)
    commit = (_git(root, "rev-parse", "HEAD") or "").strip()
    if not commit:
        return {}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {GIT_COMMIT: commit, GIT_DIRTY: "unknown" if status is None else str(bool(status.strip())).lower()}


def dvc_lock_hashes(root: str | Path) -> dict[str, str]:
    """Per stage of ``dvc.lock``: its outputs' hashes as ``path:md5`` (what ``dvc status`` compares); {} if none."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    import yaml

    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    tags = {}
    for stage, entry in stages.items():
        outs = [f"{out['path']}:{out.get('md5') or out.get('hash') or '?'}" for out in entry.get("outs") or []]
        if outs:
            tags[f"{DVC_LOCK_PREFIX}{stage}"] = ",".join(outs)[:TAG_LIMIT]
    return tags


def data_version(data_root: str | Path) -> str:
    """The dataset's version: DVC's hash of the prepared data when dvc.lock has it, else a hash of its marker.

    Models are only compared (promotion) when trained and evaluated on the same data version.
    """
    data_root = Path(data_root)
    root = project_root()
    lock = root / "dvc.lock"
    if lock.is_file():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                out_path = (root / out["path"]).resolve()
                if out_path == data_root.resolve() or out_path in data_root.resolve().parents:
                    return str(out.get("md5", "unknown"))
    digest = hashlib.md5()
    marker = data_root / COMPLETE_MARKER
    if marker.is_file():
        digest.update(marker.read_bytes())
    else:  # no marker: the split lists still pin which images are used
        for split_file in sorted((data_root / "ImageSets" / "Segmentation").glob("*.txt")):
            digest.update(split_file.name.encode() + split_file.read_bytes())
    return digest.hexdigest()


def split_ids(data_root: str | Path, split: str) -> list[str]:
    """The image ids of a split, as the evaluation reads them (VOC split files, packaged or SBD splits)."""
    return list(VOCSegmentation(data_root, split).ids)


def ids_digest(ids: list[str]) -> str:
    """sha256 of the sorted, newline-joined image ids: equal exactly when two splits hold the same images."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def evaluation_set(data_root: str | Path, split: str, data_version: str) -> dict[str, str]:
    """What a model was scored on, as version tags: data version, split name, hash and count of its image ids."""
    ids = split_ids(data_root, split)
    return {"data_version": str(data_version), "eval_split": split, "eval_ids_sha256": ids_digest(ids),
            "eval_num_images": str(len(ids))}


def dataset_source(data_cfg: Any, root: str | Path) -> dict[str, str]:
    """Where the data came from: VOC's URL and MD5 (pinned in ``data.dvc``), or the synthetic generator's seed."""
    if data_cfg.get("source") == "synthetic":
        synthetic = data_cfg.get("synthetic") or {}
        return {"url": f"synthetic://fcnseg.data.synthetic?seed={synthetic.get('seed', '')}", "md5": ""}
    pin = Path(root) / "data.dvc"
    if pin.is_file():
        import yaml

        spec = yaml.safe_load(pin.read_text()) or {}
        url = ((spec.get("deps") or [{}])[0]).get("path", "")
        md5 = ((spec.get("outs") or [{}])[0]).get("md5", "")
        return {"url": str(url), "md5": str(md5)}
    return {"url": "", "md5": ""}


def log_datasets(run_id: str, data_cfg: Any, root: str | Path, splits: dict[str, str]) -> None:
    """``mlflow.log_input`` per split (``{"training": "train", "validation": "val"}``): name, source, MD5, split."""
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    source = dataset_source(data_cfg, root)
    url = source["url"] or f"file://{Path(str(data_cfg.get('root', ''))).resolve()}"
    with mlflow.start_run(run_id=run_id):  # call with no active run
        for context, split in splits.items():
            try:
                digest = ids_digest(split_ids(data_cfg["root"], split))
            except Exception:  # a split not on this machine (e.g. SBD's train_aug without SBD): still say which
                digest = ""
            dataset = MetaDataset(HTTPDatasetSource(url), name=f"{data_cfg.get('name', 'data')}/{split}",
                                  digest=digest[:16] or None)
            mlflow.log_input(dataset, context=context,
                             tags={"split": split, "md5": source["md5"], "ids_sha256": digest})
