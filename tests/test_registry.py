"""Model registry on a real SQLite MLflow store: registration, gated promotion, the CLI, concurrent promotions."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest

from fcnseg import registry
from fcnseg.errors import TrackingError
from fcnseg.runs import using_store

_names = itertools.count()


class Echo(mlflow.pyfunc.PythonModel):
    """The cheapest loggable model: returns its input."""

    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store per module with one logged pyfunc model (creating a store costs seconds)."""
    db = tmp_path_factory.mktemp("registry") / "mlflow.db"
    uri = f"sqlite:///{db}"
    # module-scoped: outlives the per-test reset of MLflow's defaults (conftest), so it must leave none behind
    with using_store(uri):
        experiment_id = mlflow.MlflowClient(uri).create_experiment("registry-tests")
        with mlflow.start_run(experiment_id=experiment_id) as run:
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
    yield {"uri": uri, "db": db, "model_uri": info.model_uri, "run_id": run.info.run_id,
           "client": registry.client_for(uri)}


@pytest.fixture
def name():
    return f"fcn-test-{next(_names)}"  # each test gets its own registered model


CLASSES = ("background", "cat", "dog")


def add(store, name, iou, data="abc", model_uri=None, split="val", ids="1" * 64, per_class=None):
    """A version scored on evaluation set (data, split, ids); per-class IoU all equal to ``iou`` unless given."""
    version = registry.register_model(
        model_uri or store["model_uri"], name, val_mean_iou=iou, data_version=data, client=store["client"],
        tags={"model": "fcn8s"}, evaluation={"data_version": data, "eval_split": split, "eval_ids_sha256": ids},
        per_class_iou=per_class if per_class is not None else dict.fromkeys(CLASSES, iou))
    return int(version.version)


def tags(store, name, version):
    return store["client"].get_model_version(name, str(version)).tags


def champion(store, name):
    return int(store["client"].get_model_version_by_alias(name, "champion").version)


def cli(store, *args):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, "-m", "fcnseg.cli", *args, "--tracking-uri", store["uri"]],
                          capture_output=True, text=True, env=env, timeout=120)


def test_register_tags_and_challenger_alias_for_both_uri_kinds(store, name):
    v1 = add(store, name, 0.5)
    v2 = add(store, name, 0.6, model_uri=f"runs:/{store['run_id']}/model")
    t = tags(store, name, v2)
    assert (t["val_mean_iou"], t["data_version"], t["model"]) == ("0.6", "abc", "fcn8s")
    assert int(store["client"].get_model_version_by_alias(name, "challenger").version) == v2
    assert [row["version"] for row in registry.list_versions(name, client=store["client"])] == [v1, v2]
    with using_store(store["uri"]):  # models:/ URIs resolve in MLflow's default store
        loaded = mlflow.pyfunc.load_model(f"models:/{name}/{v2}")
    assert loaded.predict({"a": [1]})["a"][0] == 1


def test_first_version_becomes_champion_and_alias_uri_resolves(store, name):
    v1 = add(store, name, 0.4)
    decision = registry.promote(name, v1, client=store["client"])
    assert decision.promoted and decision.previous_champion is None
    assert champion(store, name) == v1
    assert "no champion yet" in decision.summary()
    assert tags(store, name, v1)["promotion_decision"] == "promoted"
    with using_store(store["uri"]):
        assert mlflow.pyfunc.load_model(f"models:/{name}@champion").metadata.model_uuid  # the URI resolves


def test_better_challenger_is_promoted(store, name):
    v1, v2 = add(store, name, 0.7011), add(store, name, 0.7312)
    registry.promote(name, v1, client=store["client"])
    decision = registry.promote(name, v2, client=store["client"])
    assert decision.promoted and decision.previous_champion == v1
    assert decision.summary() == (f"promoted {name} v{v2} to champion: val mIoU 0.7312 > 0.7011 (v{v1}) on data abc, "
                                  f"split val (ids 111111111111), no class drops by more than 0.0500")
    assert champion(store, name) == v2
    t = tags(store, name, v2)
    assert (t["promotion_decision"], t["compared_to_version"]) == ("promoted", str(v1))
    assert float(t["champion_val_mean_iou"]) == 0.7011 and float(t["challenger_val_mean_iou"]) == 0.7312
    rows = registry.list_versions(name, client=store["client"])
    assert "champion" in rows[1]["aliases"] and "champion" not in rows[0]["aliases"]


def test_worse_or_equal_challenger_keeps_champion(store, name):
    v1, v2, v3 = add(store, name, 0.7011), add(store, name, 0.69), add(store, name, 0.7011)
    registry.promote(name, v1, client=store["client"])
    decision = registry.promote(name, v2, client=store["client"])
    assert not decision.promoted
    assert decision.summary() == f"kept champion v{v1}: challenger v{v2} val mIoU 0.6900 <= 0.7011"
    assert champion(store, name) == v1
    t = tags(store, name, v2)
    assert (t["promotion_decision"], t["compared_to_version"]) == ("kept", str(v1))
    assert float(t["champion_val_mean_iou"]) == 0.7011 and float(t["challenger_val_mean_iou"]) == 0.69
    assert not registry.promote(name, v3, client=store["client"]).promoted  # equal is not better


def test_other_data_version_refused_via_cli_unless_forced(store, name):
    v1, v2 = add(store, name, 0.5, data="def"), add(store, name, 0.9, data="abc")
    registry.promote(name, v1, client=store["client"])
    refused = cli(store, "promote", name, str(v2))
    assert refused.returncode == 0, refused.stderr
    assert refused.stdout.strip() == (f"refused: v{v2} was evaluated on data abc, split val (ids 111111111111), "
                                      f"champion v{v1} on data def, split val (ids 111111111111); not the same "
                                      f"evaluation set, use --force to promote anyway")
    assert champion(store, name) == v1
    assert tags(store, name, v2)["promotion_decision"] == "refused"
    forced = registry.promote(name, v2, force=True, client=store["client"])
    assert forced.promoted and forced.summary().startswith(f"promoted {name} v{v2} to champion (forced)")
    assert champion(store, name) == v2
    assert tags(store, name, v2)["promotion_forced"] == "true"


def test_force_also_overrides_a_worse_score(store, name):
    v1, v2 = add(store, name, 0.8), add(store, name, 0.1)
    registry.promote(name, v1, client=store["client"])
    assert registry.promote(name, v2, force=True, client=store["client"]).promoted
    assert champion(store, name) == v2


def test_missing_iou_tag_is_an_error_unless_forced(store, name):
    v1 = add(store, name, 0.5)
    store["client"].delete_model_version_tag(name, str(v1), "val_mean_iou")
    with pytest.raises(TrackingError, match="no val_mean_iou tag"):
        registry.promote(name, v1, client=store["client"])
    assert registry.promote(name, v1, force=True, client=store["client"]).promoted


def test_unknown_version_is_one_line_cli_error(store, name):
    add(store, name, 0.5)
    result = cli(store, "promote", name, "99")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {name} has no version 99 in ")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("model, version, expected", [
    ("no-such-model", "1", "no registered model named 'no-such-model'"),
    (None, "three", "must be a positive integer"),
])
def test_unknown_model_or_bad_version_is_a_tracking_error(store, name, model, version, expected):
    add(store, name, 0.5)
    with pytest.raises(TrackingError, match=expected) as caught:
        registry.promote(model or name, version, client=store["client"])
    assert "\n" not in str(caught.value)


def test_missing_store_is_a_tracking_error(tmp_path):
    with pytest.raises(TrackingError, match="no MLflow database"):
        registry.client_for(f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()


# Each process imports everything and opens the store (MLflow caches it), says it is ready, then waits for the go
# file, so both promotions really run at the same moment (without the lock this race was seen to promote both).
RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fcnseg import cli, registry
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    registry.client_for(sys.argv[-1]).search_registered_models(max_results=1)
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    cli.main(sys.argv[3:])
""")


def start_promoters(tmp_path, uri, name, versions, wait_s=120.0) -> list[subprocess.Popen]:
    """One RACER process per version, all promoting at the same moment; returns them once they have been let go."""
    go = tmp_path / "go"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / f"ready{v}"), str(go),
                               "promote", name, str(v), "--tracking-uri", uri],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for v in versions]
    deadline = time.monotonic() + wait_s
    while not all((tmp_path / f"ready{v}").exists() for v in versions) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    return procs


def assert_serial_history(client, name, v1, a, b):
    """Two promoters raced for a > v1 and b > a: the end state is one that some serial order produces."""
    winner = int(client.get_registered_model(name).aliases["champion"])
    assert winner in (a, b)
    loser = b if winner == a else a
    won, lost = (client.get_model_version(name, str(v)).tags for v in (winner, loser))
    assert won["promotion_decision"] == "promoted"
    # Serial histories only: either the loser went first (promoted over v1, then beaten by the winner),
    # or the winner went first and the loser was compared with it and kept out.
    loser_first = (lost["promotion_decision"], lost["compared_to_version"], won["compared_to_version"]) == (
        "promoted", str(v1), str(loser))
    winner_first = (won["compared_to_version"], lost["promotion_decision"], lost["compared_to_version"]) == (
        str(v1), "kept", str(winner))
    assert loser_first or winner_first, (won, lost)
    assert winner == b  # in any serial order the better challenger ends up champion


def test_concurrent_promotions_leave_one_consistent_champion(store, name, tmp_path):
    v1, a, b = add(store, name, 0.5), add(store, name, 0.6), add(store, name, 0.7)
    registry.promote(name, v1, client=store["client"])
    for proc in start_promoters(tmp_path, store["uri"], name, (a, b)):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert_serial_history(store["client"], name, v1, a, b)
