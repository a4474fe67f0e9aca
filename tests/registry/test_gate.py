"""The promotion gate on its own: plain tag dicts in, a decision out; no MLflow store, client or entity."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from fcnseg.errors import TrackingError
from fcnseg.registry import gate

SET_A = {"data_version": "d1", "eval_split": "val", "eval_ids_sha256": "a" * 64}
SET_B = {**SET_A, "eval_split": "seg11valid", "eval_ids_sha256": "b" * 64}


def tags(iou: float | None, evaluation: dict = SET_A, per_class: dict | None = None) -> dict[str, str]:
    out = dict(evaluation)
    if iou is not None:
        out["val_mean_iou"] = repr(iou)
        out["per_class_iou"] = json.dumps(per_class if per_class is not None else {"background": iou, "cat": iou})
    return out


def test_the_gate_module_imports_no_mlflow():
    tree = ast.parse(Path(gate.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(name.split(".")[0] == "mlflow" for name in imported), imported


def test_first_version_becomes_champion():
    decision = gate.decide("m", 1, tags(0.5), None, None)
    assert (decision.promoted, decision.decision, decision.previous_champion) == (True, "promoted", None)


def test_strictly_better_on_the_same_set_is_promoted_and_equal_is_kept():
    better = gate.decide("m", 2, tags(0.6), tags(0.5), 1)
    assert better.promoted and better.per_class_delta == {"background": 0.1, "cat": 0.1}
    equal = gate.decide("m", 2, tags(0.5), tags(0.5), 1)
    assert (equal.promoted, equal.decision) == (False, "kept")


def test_another_evaluation_set_is_refused_even_when_better():
    decision = gate.decide("m", 2, tags(0.9, SET_B), tags(0.5), 1)
    assert decision.decision == "refused" and "not the same evaluation set" in decision.reason
    assert decision.per_class_delta is None  # never compared class by class across sets


def test_a_class_dropping_past_the_margin_refuses_a_higher_mean():
    champion = tags(0.5, per_class={"background": 0.5, "cat": 0.5})
    challenger = tags(0.6, per_class={"background": 0.9, "cat": 0.44})
    refused = gate.decide("m", 2, challenger, champion, 1)  # the default margin, 0.05: cat drops 0.06
    assert refused.decision == "refused" and "cat -0.0600" in refused.reason
    assert gate.decide("m", 2, challenger, champion, 1, per_class_margin=0.1).promoted


def test_missing_per_class_iou_refuses_and_missing_mean_iou_raises():
    no_table = {**tags(0.6)}
    del no_table["per_class_iou"]
    assert gate.decide("m", 2, no_table, tags(0.5), 1).decision == "refused"
    with pytest.raises(TrackingError, match="no val_mean_iou tag"):
        gate.decide("m", 2, tags(None), tags(0.5), 1)


def test_force_promotes_anything_and_says_so():
    decision = gate.decide("m", 2, tags(0.1, SET_B), tags(0.9), 1, force=True)
    assert decision.promoted and decision.forced and "(forced)" in decision.reason
    assert gate.decide("m", 1, tags(0.1), tags(0.1), 1, force=True).decision == "already_champion"


def test_decision_tags_record_the_decision_and_each_delta():
    decision = gate.decide("m", 2, tags(0.6), tags(0.5), 1)
    recorded = gate.decision_tags(decision, 0.05, "2026-01-01T00:00:00+00:00")
    assert recorded["promotion_decision"] == "promoted" and recorded["compared_to_version"] == "1"
    assert recorded["iou_delta.cat"] == "+0.100000" and recorded["promotion_forced"] == "false"
