"""Lineage: what a run and a registered version were made from (git tree, DVC stages, dataset, evaluation set).

Recorded as MLflow tags (runs and model versions alike) and, for the dataset, as an MLflow run input
(``mlflow.log_input``: name, source URL, MD5, split), so the UI's run page shows it and the registry can say how
to rebuild a version (``fcnseg reproduce``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any


GIT_COMMIT, GIT_DIRTY = "git_commit", "git_dirty"
# A DVC experiment (`dvc exp run`, --temp, --queue): DVC passes its name and baseline to every stage it runs
EXP_NAME, EXP_BASELINE, EXP_COMMIT = "dvc_exp_name", "dvc_exp_baseline", "dvc_exp_commit"
DVC_LOCK_PREFIX = "dvc_lock."
EVAL_KEYS = ("data_version", "eval_split", "eval_ids_sha256")  # an evaluation set: all three must match
TAG_LIMIT = 5000  # MLflow's limit on a tag value


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def dvc_experiment() -> dict[str, str]:
    """The DVC experiment this process runs in (``dvc_exp_name``, ``dvc_exp_baseline``); {} under ``dvc repro`` or
    outside DVC."""
    name, baseline = os.environ.get("DVC_EXP_NAME"), os.environ.get("DVC_EXP_BASELINE_REV")
    return {EXP_NAME: name, EXP_BASELINE: baseline} if name and baseline else {}


def exp_ref(baseline: str, name: str) -> str:
    """The git ref DVC commits an experiment to once it has run (what `dvc exp push/pull/apply` move)."""
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def exp_commit(root: str | Path, baseline: str, name: str) -> str | None:
    """The experiment's commit, when its ref is in the git repository at ``root``; else None."""
    found = _git(Path(root), "rev-parse", "--verify", "--quiet", f"{exp_ref(baseline, name)}^{{commit}}")
    return found.strip() if found and found.strip() else None


def dvc_applied_paths(root: str | Path) -> list[str]:
    """What a DVC experiment writes into the workspace itself: params files, ``dvc.lock`` and every stage's
    outputs (paths relative to the project root). Changes there are the experiment, not a dirty tree."""
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        paths = {"dvc.lock"} | {os.path.relpath(out.fs_path, repo.root_dir) for out in repo.index.outs}
        for stage in repo.index.stages:
            paths |= {os.path.relpath(dep.fs_path, repo.root_dir) for dep in getattr(stage, "params", [])}
        return sorted(paths)
    finally:
        repo.close()


def git_state(root: str | Path, experiment: dict[str, str] | None = None) -> dict[str, str]:
    """``git_commit`` (HEAD) and ``git_dirty`` ("true" when tracked files differ from HEAD); {} outside git.

    Inside a DVC experiment (``experiment``, default :func:`dvc_experiment`) the changes DVC applied (params, lock,
    outputs) do not count as dirty, any other change does; the experiment's name and baseline are added."""
    root = Path(root)
    commit = (_git(root, "rev-parse", "HEAD") or "").strip()
    if not commit:
        return {}
    experiment = dvc_experiment() if experiment is None else experiment
    excluded: list[str] = []
    if experiment:
        try:
            excluded = [f":(top,exclude){path}" for path in dvc_applied_paths(root)]
        except Exception:  # no readable DVC project here: count every change
            excluded = []
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                  *excluded)
    state = {GIT_COMMIT: commit, GIT_DIRTY: "unknown" if status is None else str(bool(status.strip())).lower()}
    return {**state, **experiment}


def dvc_lock_outs(root: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Per stage of ``root``'s ``dvc.lock``: its outputs as DVC records them (``path``, ``md5``, …); {} if none."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    import yaml

    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    return {stage: list(entry.get("outs") or []) for stage, entry in stages.items()}


def dvc_lock_hashes(root: str | Path) -> dict[str, str]:
    """Per stage of ``dvc.lock``: its outputs' hashes as ``path:md5`` (what ``dvc status`` compares); {} if none."""
    tags = {}
    for stage, stage_outs in dvc_lock_outs(root).items():
        outs = [f"{out['path']}:{out.get('md5') or out.get('hash') or '?'}" for out in stage_outs]
        if outs:
            tags[f"{DVC_LOCK_PREFIX}{stage}"] = ",".join(outs)[:TAG_LIMIT]
    return tags


def workspace_root(start: Path | None = None) -> Path:
    """The DVC workspace this process runs in: the nearest directory holding dvc.yaml (a temporary experiment's
    copy counts as its own workspace, unlike :func:`fcnseg.runs.project_root`)."""
    here = (start or Path.cwd()).resolve()
    return next((c for c in (here, *here.parents) if (c / "dvc.yaml").is_file()), here)


def data_version(data_root: str | Path) -> str:
    """The dataset's version: DVC's hash of the prepared data when dvc.lock has it, else a hash of its marker.

    Models are only compared (promotion) when trained and evaluated on the same data version.
    """
    data_root = Path(data_root)
    # The lock of the workspace this runs in: a `--temp`/`--queue` experiment's own copy, whose lock holds its own
    # prepare stage's hash (the main project's lock names paths in another directory, and would never match).
    root = workspace_root()
    for stage, stage_outs in dvc_lock_outs(root).items():
        for out in stage_outs:
            out_path = (root / out["path"]).resolve()
            if out_path == data_root.resolve() or out_path in data_root.resolve().parents:
                # own data prepared from a folder or archive the user tracks with `dvc add`: that data's DVC hash
                tracked = _tracked_dep(root, stage)
                return tracked or str(out.get("md5", "unknown"))
    from fcnseg.data.pin import dvc_tracked

    in_place = dvc_tracked(data_root)  # data.root itself tracked with `dvc add`, used as it is
    if in_place is not None:
        return in_place[1]
    from fcnseg.data.voc import COMPLETE_MARKER  # here, not at the top: the registry CLI must not import torch

    digest = hashlib.md5()
    marker = data_root / COMPLETE_MARKER
    recorded = _marker_field(marker, "dvc_md5")  # prepared outside DVC from a `dvc add`-tracked input
    if recorded:
        return recorded
    voc_splits = data_root / "ImageSets" / "Segmentation"
    if marker.is_file() and _marker_field(marker, "input") is None:
        digest.update(marker.read_bytes())  # extracted or generated by prepare: the marker says from what
    elif not marker.is_file() and voc_splits.is_dir():  # a VOC directory of the user's: its split lists
        for split_file in sorted(voc_splits.glob("*.txt")):
            digest.update(split_file.name.encode() + split_file.read_bytes())
    else:  # own data used in place, or prepared from an input no .dvc file tracks: what files it holds
        _digest_listing(digest, data_root, skip=COMPLETE_MARKER)
    return digest.hexdigest()


def _digest_listing(digest: Any, root: Path, skip: str) -> None:
    """Every file under ``root`` by relative path and size, split lists (``*.txt``) by content: cheap (no image is
    read), and two folders of other images, masks or splits get other versions."""
    for path in sorted(root.rglob("*")):
        if path.name == skip or not path.is_file():
            continue
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\n".encode())
        if path.suffix == ".txt":
            digest.update(path.read_bytes())


def _marker_field(marker: Path, key: str) -> str | None:
    import json

    try:
        value = json.loads(marker.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def _tracked_dep(root: Path, stage: str) -> str | None:
    """The DVC hash ``dvc.lock`` records for a dependency of ``stage`` that ``dvc add`` tracks (own data)."""
    import yaml

    from fcnseg.data.pin import dvc_tracked

    entry = ((yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages") or {}).get(stage) or {}
    for dep in entry.get("deps") or []:
        if dep.get("path") and dvc_tracked(root / dep["path"]) is not None:
            return str(dep.get("md5") or dep.get("hash") or "") or None
    return None


def tracked_input(data_cfg: Any) -> dict[str, str] | None:
    """Own data's origin: ``data.input`` (a folder or archive tracked with ``dvc add``) as ``path``, its
    ``dvc_file`` and the ``md5`` DVC records (what ``dvc pull <dvc_file>`` brings back); None without
    ``data.input`` or when no ``.dvc`` file tracks it (then ``dvc_file`` and ``md5`` would be unknown)."""
    value = data_cfg.get("input") if data_cfg is not None else None
    if not value:
        return None
    from fcnseg.data.pin import dvc_tracked

    path = Path(str(value))
    located = path if path.is_absolute() else workspace_root() / path
    tracked = dvc_tracked(located)
    if tracked is None:
        return None
    return {"path": str(value), "dvc_file": f"{value}.dvc", "md5": tracked[1]}


def split_ids(data_root: str | Path, split: str, data: Any = None) -> list[str]:
    """The image ids of a split, as the evaluation reads them: VOC split files (packaged or SBD splits), or, for
    ``data`` (a data config) of another layout, its reader's (:func:`fcnseg.data.layouts.open_split`)."""
    if data is not None and (data.get("layout") or "voc") != "voc":
        from fcnseg.data.layouts import open_split

        return list(open_split(_plain(data), split, root=str(data_root)).ids)
    from fcnseg.data.voc import VOCSegmentation

    return list(VOCSegmentation(data_root, split).ids)


def _plain(data: Any) -> Any:
    """A data config as plain containers (an OmegaConf node resolved), as the dataset spec reads it."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else data


def ids_digest(ids: list[str]) -> str:
    """sha256 of the sorted, newline-joined image ids: equal exactly when two splits hold the same images."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def evaluation_set(data_root: str | Path, split: str, data_version: str, data: Any = None) -> dict[str, str]:
    """What a model was scored on, as version tags: data version, split name, hash and count of its image ids
    (``data``: the data config whose reader lists them; None: VOC split files)."""
    ids = split_ids(data_root, split, data)
    return {"data_version": str(data_version), "eval_split": split, "eval_ids_sha256": ids_digest(ids),
            "eval_num_images": str(len(ids))}


def dataset_source(data_cfg: Any, root: str | Path) -> dict[str, str]:
    """Where the data came from, by ``data.source``: the synthetic generator's seed; a folder or archive the user
    tracks with ``dvc add`` (``data.input``: its path and DVC's MD5, ``dvc_file`` naming its ``.dvc`` file);
    ADE20K's public zip (``data.archive`` when given, else the first of ``data.mirrors`` or the default URL; its
    ``data.md5``); the user's Cityscapes zips (``data.zips``, ``data.md5``);
    VOC's URL and MD5 (pinned in ``data.dvc``). ``url`` is empty when nothing records it (data used in place)."""
    source = data_cfg.get("source")
    if source == "synthetic":
        synthetic = data_cfg.get("synthetic") or {}
        return {"url": f"synthetic://fcnseg.data.synthetic?seed={synthetic.get('seed', '')}", "md5": ""}
    tracked = tracked_input(data_cfg) if data_cfg.get("input") else None
    if tracked:
        return {"url": str(tracked["path"]), "md5": str(tracked.get("md5") or ""),
                "dvc_file": str(tracked.get("dvc_file") or "")}
    if source == "ade20k":
        from fcnseg.data.fetch import ADE20K

        archive, mirrors = data_cfg.get("archive"), list(data_cfg.get("mirrors") or [])
        url = f"file://{Path(str(archive)).resolve()}" if archive else (mirrors or list(ADE20K.urls))[0]
        return {"url": str(url), "md5": str(data_cfg.get("md5") or ADE20K.md5 or "")}
    if source == "cityscapes":
        zips, md5 = dict(data_cfg.get("zips") or {}), data_cfg.get("md5")
        md5 = dict(md5) if isinstance(md5, Mapping) else {}
        return {"url": " ".join(f"file://{Path(str(z)).resolve()}" for z in zips.values() if z),
                "md5": " ".join(str(md5.get(key) or "") for key, z in zips.items() if z).strip()}
    if not from_voc_tarball(data_cfg):  # a folder used in place: dvc-added itself, or no record of its origin
        from fcnseg.data.pin import dvc_tracked

        tracked_root = dvc_tracked(data_cfg.get("root")) if data_cfg.get("root") else None
        if tracked_root is not None:
            return {"url": str(data_cfg.get("root")), "md5": tracked_root[1], "dvc_file": str(tracked_root[0])}
        return {"url": "", "md5": ""}
    pin = Path(root) / "data.dvc"
    if pin.is_file():
        import yaml

        spec = yaml.safe_load(pin.read_text()) or {}
        url = ((spec.get("deps") or [{}])[0]).get("path", "")
        md5 = ((spec.get("outs") or [{}])[0]).get("md5", "")
        return {"url": str(url), "md5": str(md5)}
    return {"url": "", "md5": ""}


def from_voc_tarball(data_cfg: Any) -> bool:
    """True when the data is PASCAL VOC from ``data.dvc``'s tarball: ``data.source`` voc and VOC's classes. A
    VOC-layout folder of other classes (``data.root=… data.class_names=[…]``) is the user's own data."""
    from fcnseg.data.classes import VOC_CLASSES

    names = data_cfg.get("class_names")
    return data_cfg.get("source") in (None, "voc") and (not names or tuple(str(n) for n in names) == VOC_CLASSES)


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
                digest = ids_digest(split_ids(data_cfg["root"], split, data_cfg))
            except Exception:  # a split not on this machine (e.g. SBD's train_aug without SBD): still say which
                digest = ""
            # MLflow keeps one dataset per (name, digest) in an experiment: the source is part of the digest, so
            # two folders named alike with the same file names stay two datasets with their own sources
            identity = hashlib.sha256(f"{url}\n{digest}".encode()).hexdigest()[:16] if digest else None
            dataset = MetaDataset(HTTPDatasetSource(url), name=f"{data_cfg.get('name', 'data')}/{split}",
                                  digest=identity)
            mlflow.log_input(dataset, context=context,
                             tags={"split": split, "md5": source["md5"], "ids_sha256": digest})
