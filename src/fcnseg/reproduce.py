"""``fcnseg reproduce models:/NAME@ALIAS``: the exact commands that rebuild a registered version.

A version trained by ``dvc exp run`` (workspace, ``--temp``, ``--queue``): ``dvc exp pull`` when only the team has
it, then ``git checkout <baseline>`` + ``dvc exp apply <name>`` (or ``git checkout <experiment commit>`` where
data.dvc's tarball is absent, which ``dvc exp apply`` would fail to check out), then ``dvc repro --force``. Otherwise, from the version's
lineage: ``git checkout <commit>``, the data (synthetic: regenerated from its seed by training;
VOC: ``dvc pull data.dvc`` from the team's remote, then ``fcnseg fetch``, which verifies the pinned tarball and
downloads it when the pull could not; your own data: ``dvc pull <data.input>.dvc`` and the prepare stage, ADE20K's
download or Cityscapes' zips, see :func:`own_data_steps`), then ``python -m fcnseg.train`` with the
overrides that turn the config composed at that commit into the run's logged ``config.yaml``. Machine-specific
settings (``paths.*``, the tracking URI and run name, ``ckpt_path``) are left out: the rebuild writes to
``reproduce/<name>-v<version>`` and, with ``--run``, is tracked in the store the version was read from.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcnseg.errors import FcnsegError, TrackingError, one_line
from fcnseg.lineage import from_voc_tarball
from fcnseg.runs import auth_problem

LOCAL_KEYS = ("paths.", "tracking.tracking_uri", "tracking.run_name", "ckpt_path")
_BARE = re.compile(r"[A-Za-z0-9_./\-]+")
_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass
class Plan:
    name: str
    version: int
    commands: list[list[str]]
    notes: list[str] = field(default_factory=list)
    tracking_uri: str | None = None  # where the version came from: --run tracks the rebuild there
    optional: dict[int, str] = field(default_factory=dict)  # command index -> why its failure does not matter

    def script(self) -> str:
        lines = [f"# rebuild {self.name} v{self.version}"] + [f"# {note}" for note in self.notes]
        return "\n".join(lines + [shlex.join(command) + (f"  # {self.optional[i]}" if i in self.optional else "")
                                   for i, command in enumerate(self.commands)])


def resolve_version(client, model_uri: str):
    """The ModelVersion of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    match = _URI.match(model_uri)
    if not match:
        raise FcnsegError(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    from mlflow.exceptions import MlflowException

    try:
        if match["alias"]:
            return client.get_model_version_by_alias(match["name"], match["alias"])
        return client.get_model_version(match["name"], match["version"])
    except MlflowException as exc:
        auth = auth_problem(exc, f"read {model_uri}", client.tracking_uri)
        raise TrackingError(auth or f"cannot find {model_uri}: {one_line(exc)}; list "
                                    f"versions with `fcnseg models {match['name']}`") from exc


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings quoted unless plain words that parse as strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    import yaml

    if _BARE.fullmatch(text) and isinstance(yaml.safe_load(text), str) and text.lower() not in ("true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_at_commit(root: Path, commit: str | None, run_paths: dict[str, Any],
                      overrides: list[str] | None = None) -> dict[str, Any]:
    """The training config as composed from ``conf/`` at ``commit`` (the working tree's when None) with
    ``overrides``, and the run's ``paths`` so that path interpolations resolve as they did for the run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory() as tmp:
        conf = root / "conf"
        if commit:
            archive = subprocess.run(["git", "archive", commit, "conf"], cwd=root, capture_output=True, timeout=60)
            if archive.returncode != 0:
                raise FcnsegError(f"commit {commit[:12]} is not in the git repository at {root} "
                                  f"({archive.stderr.decode(errors='replace').strip()[:200]}); git fetch it first")
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True, timeout=60)
            conf = Path(tmp) / "conf"
        paths = [f"paths.{key}={hydra_value(value)}" for key, value in run_paths.items()]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf.resolve()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=paths + list(overrides or []))
        GlobalHydra.instance().clear()
        return OmegaConf.to_container(cfg, resolve=True)


def _portable(value: Any, run_paths: dict[str, Any]) -> Any:
    """A value under one of the run's ``paths`` as an interpolation of that path (``${paths.data_dir}/…``)."""
    if isinstance(value, str):
        for key, root in sorted(run_paths.items(), key=lambda item: -len(str(item[1] or ""))):
            if root and isinstance(root, str) and (value == root or value.startswith(root.rstrip("/") + "/")):
                return "${paths." + key + "}" + value[len(root.rstrip("/")):] if value != root else "${paths." + key + "}"
    if isinstance(value, dict):
        return {k: _portable(v, run_paths) for k, v in value.items()}
    return value


def training_overrides(logged: dict[str, Any], default: dict[str, Any], prefix: str = "",
                       run_paths: dict[str, Any] | None = None) -> list[str]:
    """Hydra overrides that make ``default`` equal ``logged`` (machine-specific keys left out; values under the
    run's ``paths`` written relative to them, so they follow this machine's ``paths``)."""
    if run_paths is None:
        run_paths = {k: v for k, v in (logged.get("paths") or {}).items() if isinstance(v, str)}
    overrides = []
    for key, value in logged.items():
        path = f"{prefix}{key}"
        if path.startswith(LOCAL_KEYS) or path == "hydra":
            continue
        if key not in default:
            overrides.append(f"+{path}={hydra_value(_portable(value, run_paths))}")
        elif isinstance(value, dict) and isinstance(default[key], dict):
            overrides += training_overrides(value, default[key], f"{path}.", run_paths)
        elif value != default[key]:
            overrides.append(f"{path}={hydra_value(_portable(value, run_paths))}")
    overrides += [f"~{prefix}{key}" for key in default if key not in logged and not f"{prefix}{key}".startswith(LOCAL_KEYS)]
    return overrides


def plan(client, model_uri: str, root: Path) -> Plan:
    """The commands that rebuild the version ``model_uri`` names, from its lineage and its run's config."""
    from omegaconf import OmegaConf

    version = resolve_version(client, model_uri)
    name, number = version.name, int(version.version)
    tags = version.tags or {}
    if not version.run_id:
        raise FcnsegError(f"{name} v{number} has no MLflow run, so there is no recorded recipe to rebuild it from")
    run = client.get_run(version.run_id)
    commit = tags.get("git_commit") or run.data.tags.get("git_commit") or run.data.tags.get("mlflow.source.git.commit")
    notes = []
    if run.data.tags.get("imported") == "true":
        raise FcnsegError(f"{name} v{number} holds imported weights ({run.data.tags.get('source_weights', '?')}); "
                          f"there is no training run to rebuild it from")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config_file = client.download_artifacts(version.run_id, "config.yaml", tmp)
        except Exception as exc:
            raise FcnsegError(f"run {version.run_id} of {name} v{number} has no config.yaml artifact, so its "
                              f"training config is unknown") from exc
        logged = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    experiment = experiment_of(client, version, run, root)
    if experiment is not None:  # trained by `dvc exp run`: DVC's own way back to it, then `dvc repro`
        return _experiment_plan(version, experiment, notes, client.tracking_uri, root)
    commands: list[list[str]] = []
    optional: dict[int, str] = {}
    if commit:
        commands.append(["git", "checkout", commit])
        if (tags.get("git_dirty") or run.data.tags.get("git_dirty")) == "true":
            notes.append("the working tree had uncommitted changes when it was trained: they are not in the commit")
    else:
        notes.append("no git commit recorded: the config is composed from this checkout's conf/")
    data = logged.get("data") or {}
    default = compose_at_commit(root, commit, {k: v for k, v in (logged.get("paths") or {}).items()
                                               if not isinstance(v, dict)})
    overrides = training_overrides(logged, default)
    source = data.get("source")
    if source == "synthetic":
        notes.append(f"synthetic data: training regenerates it from seed {(data.get('synthetic') or {}).get('seed')}")
    elif from_voc_tarball(data):
        data_dir = str((logged.get("paths") or {}).get("data_dir", "data"))
        optional[len(commands)] = "from the team's DVC remote; without one, fcnseg fetch downloads it"
        commands.append(["dvc", "pull", "data.dvc"])
        commands.append(["fcnseg", "fetch", "--data-dir", "data"] + (["--sbd"] if data.get("sbd") else []))
        if data_dir != "data":
            notes.append(f"the run read its data from {data_dir}; the rebuild uses ./data")
    else:
        commands += own_data_steps(data, overrides, notes, optional, len(commands))
    out_dir = f"reproduce/{name}-v{number}"
    commands.append(["python", "-m", "fcnseg.train", *overrides,
                     f"paths.output_dir={out_dir}", f"tracking.run_name=reproduce-{name}-v{number}"])
    notes.append(f"then compare: fcnseg models {name} (the rebuild logs a new run; register it with dvc repro "
                 f"or promote by hand)")
    return Plan(name, number, commands, notes, client.tracking_uri, optional)


CITYSCAPES_LOGIN = "https://www.cityscapes-dataset.com/downloads/"


def own_data_steps(data: dict[str, Any], overrides: list[str], notes: list[str], optional: dict[int, str],
                   first: int) -> list[list[str]]:
    """How a dataset other than VOC comes back (``data.source``), then the prepare stage with the run's own
    overrides (``python -m fcnseg.pipeline prepare``): a ``dvc add``-tracked folder or archive (``data.input``) is
    pulled from the team's DVC remote; ADE20K's public zip is downloaded and checked by prepare; Cityscapes' zips
    need the user's login; a folder the run read in place is the user's to put back."""
    source, commands = data.get("source"), []
    prepare = ["python", "-m", "fcnseg.pipeline", "prepare", *overrides]
    if data.get("input"):
        optional[first] = (f"from the team's DVC remote; without one, {data['input']} must already be here (the "
                           f"version's data_version is its DVC hash)")
        return [["dvc", "pull", f"{data['input']}.dvc"], prepare]
    if source == "ade20k":
        notes.append("ADE20K: prepare downloads ADEChallengeData2016.zip (or uses data.archive), MD5-checked")
        return [prepare]
    if source == "cityscapes":
        zips = data.get("zips") or {}
        notes.append(f"Cityscapes needs a login: download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip at "
                     f"{CITYSCAPES_LOGIN} to {', '.join(str(z) for z in zips.values() if z) or 'data.zips.*'}; "
                     f"prepare checks them (data.md5.*) and extracts them")
        return [prepare]
    from fcnseg.data.pin import dvc_tracked

    if data.get("root") and dvc_tracked(data["root"]) is not None:  # `dvc add` of the data folder itself
        optional[first] = "from the team's DVC remote; without one, the data must already be there"
        return [["dvc", "pull", f"{data['root']}.dvc"]]
    notes.append(f"the run read its own data in place from {data.get('root')}, which no DVC file tracks: put the "
                 f"same data there first (or track it with `dvc add` and set data.input)")
    return commands


def experiment_of(client, version, run, root: Path) -> dict[str, str | None] | None:
    """The DVC experiment a version was trained in (name, baseline, commit), or None. The experiment's commit exists
    only once DVC has committed the experiment, after its register stage: resolved here from its git ref and then
    recorded on the version and its run (``dvc_exp_commit``)."""
    from fcnseg.lineage import EXP_BASELINE, EXP_COMMIT, EXP_NAME, exp_commit

    tags = {**run.data.tags, **(version.tags or {})}
    name, baseline = tags.get(EXP_NAME), tags.get(EXP_BASELINE)
    if not name or not baseline:
        return None
    here = exp_commit(root, baseline, name)
    if here and tags.get(EXP_COMMIT) != here:
        client.set_model_version_tag(version.name, version.version, EXP_COMMIT, here)
        client.set_tag(version.run_id, EXP_COMMIT, here)
    return {"name": name, "baseline": baseline, "commit": here or tags.get(EXP_COMMIT), "here": here}


def _experiment_plan(version, experiment: dict[str, str | None], notes: list[str], tracking_uri: str,
                     root: Path) -> Plan:
    from fcnseg.data.pin import pinned
    from fcnseg.lineage import exp_ref

    name, number, exp = version.name, int(version.version), experiment["name"]
    ref = exp_ref(experiment["baseline"], exp)
    commands: list[list[str]] = []
    optional: dict[int, str] = {}
    notes.append(f"DVC experiment {exp} (commit {str(experiment['commit'] or '?')[:12]}, ref {ref}) on baseline "
                 f"{experiment['baseline'][:12]}")
    if not experiment["here"]:
        notes.append(f"experiment {exp} is not in this repository: fetched from the team's git remote (`dvc exp push "
                     f"origin {exp}` shared it)")
        commands.append(["dvc", "exp", "pull", "origin", exp])
    tarball = pinned(root / "data.dvc")[1]
    if tarball is not None and (root / tarball).is_file():
        commands += [["git", "checkout", experiment["baseline"]], ["dvc", "exp", "apply", exp]]
    else:  # `dvc exp apply` also checks out every DVC output, data.dvc's VOC tarball included, and fails without it
        notes.append(f"the experiment's files checked out onto its baseline, as `dvc exp apply {exp}` does; that "
                     f"command also checks out data.dvc's VOC tarball, which is not here (dvc pull data.dvc)")
        commands += [["git", "checkout", experiment["baseline"]],
                     ["git", "checkout", experiment["commit"] or ref, "--", "."]]
    if (version.tags or {}).get("git_dirty") == "true":
        notes.append("the experiment's workspace had uncommitted changes besides its params: they are not in it")
    notes.append("dvc repro --force trains again (plain `dvc repro` finds the experiment's outputs up to date)")
    commands.append(["dvc", "repro", "--force"])
    notes.append(f"then compare: fcnseg models {name} (the rebuild registers a new version)")
    return Plan(name, number, commands, notes, tracking_uri, optional)


def run_plan(plan_: Plan, root: Path) -> None:
    """Runs the commands in ``root``, one after another; refuses to check out over uncommitted changes."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                            text=True, timeout=60)
    if status.returncode == 0 and status.stdout.strip() and plan_.commands[0][:2] == ["git", "checkout"]:
        raise FcnsegError(f"{root} has uncommitted changes; commit or stash them before `fcnseg reproduce --run` "
                          f"checks out {plan_.commands[0][2][:12]}")
    import sys

    for index, command in enumerate(plan_.commands, 1):
        print(f"[{index}/{len(plan_.commands)}] {shlex.join(command)}", flush=True)
        argv = [sys.executable, *command[1:]] if command[0] == "python" else command
        if command[0] == "fcnseg":
            argv = [sys.executable, "-m", "fcnseg.cli", *command[1:]]
        # the checked-out code runs, not whichever fcnseg this Python has installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"),
                                                                          os.environ.get("PYTHONPATH")]))}
        if plan_.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = plan_.tracking_uri
        done = subprocess.run(argv, cwd=root, env=env)
        if done.returncode != 0 and index - 1 in plan_.optional:
            print(f"[{index}/{len(plan_.commands)}] failed (exit code {done.returncode}); going on: "
                  f"{plan_.optional[index - 1]}", flush=True)
        elif done.returncode != 0:
            raise FcnsegError(f"step {index} failed with exit code {done.returncode}: {shlex.join(command)}")
