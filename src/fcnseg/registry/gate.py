"""The promotion gate as a pure function over plain tag dicts (a version's MLflow tags): does a challenger replace
the champion, and why. No MLflow here: :mod:`fcnseg.registry.promotion` reads the tags and writes the decision.

The ``champion`` alias moves to a version only when there is no champion yet, or when
- both were scored on the identical evaluation set: same data version, split name and sha256 of the split's sorted
  image ids (tags ``data_version``, ``eval_split``, ``eval_ids_sha256``; see :mod:`fcnseg.lineage`),
- the version's mean IoU (tag ``val_mean_iou``) is strictly higher than the champion's, and
- both predict the same classes (tag ``class_names``, the model's dataset: names in order), and
- no class's IoU (tag ``per_class_iou``, keyed by the dataset's class names) drops by more than
  ``per_class_margin`` (default 0.05 = 5 points).
``force`` overrides all of them and is recorded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from fcnseg.errors import TrackingError
from fcnseg.lineage import EVAL_KEYS

PER_CLASS_MARGIN = 0.05  # no promotion when any class's IoU drops by more than this (IoU in [0, 1])
DELTA_PREFIX = "iou_delta."
Tags = Mapping[str, str]


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


def mean_iou(tags: Tags) -> float | None:
    """The version's ``val_mean_iou`` tag as a float; None when absent or unreadable."""
    value = tags.get("val_mean_iou")
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def evaluation_set(tags: Tags) -> tuple[str | None, ...]:
    """(data version, split, image-id hash): what the version was scored on."""
    return tuple(tags.get(key) or None for key in EVAL_KEYS)


def per_class_iou(tags: Tags) -> dict[str, float] | None:
    """The ``per_class_iou`` JSON tag, finite values only; None when absent or unreadable."""
    try:
        table = json.loads(tags.get("per_class_iou") or "null")
    except ValueError:
        return None
    if not isinstance(table, dict):
        return None
    return {str(k): float(v) for k, v in table.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def class_names(tags: Tags) -> list[str] | None:
    """The ``class_names`` JSON tag (the model's dataset's classes, in order); None when absent or unreadable."""
    try:
        names = json.loads(tags.get("class_names") or "null")
    except ValueError:
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def per_class_deltas(challenger: Tags, champion: Tags) -> dict[str, float] | None:
    """Challenger − champion IoU for every class both scored; None when either lacks per-class IoU."""
    new, old = per_class_iou(challenger), per_class_iou(champion)
    if new is None or old is None:
        return None
    return {cls: round(new[cls] - old[cls], 6) for cls in new if cls in old}


def _fmt_iou(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_set(value: tuple[str | None, ...]) -> str:
    data, split, ids = value
    data_text = "unknown" if data is None else data[:12]
    if split is None or ids is None:
        return f"data {data_text}, split unknown"
    return f"data {data_text}, split {split} (ids {ids[:12]})"


def decide(name: str, version: int, challenger: Tags, champion: Tags | None, champion_version: int | None,
           force: bool = False, per_class_margin: float = PER_CLASS_MARGIN) -> PromotionDecision:
    """The gate: no champion, or on the identical evaluation set strictly better in mean IoU with no class
    dropping by more than ``per_class_margin``; ``force`` overrides. ``challenger`` and ``champion`` are the two
    versions' tags (``champion`` None, with ``champion_version`` None, when there is no champion)."""
    new_iou, new_set = mean_iou(challenger), evaluation_set(challenger)
    old_number = champion_version if champion is not None else None
    old_iou = mean_iou(champion) if champion is not None else None
    old_set = evaluation_set(champion) if champion is not None else (None, None, None)
    same_set = champion is not None and None not in new_set and new_set == old_set
    deltas = per_class_deltas(challenger, champion) if same_set else None  # only like with like

    def make(promoted: bool, decision: str, reason: str) -> PromotionDecision:
        return PromotionDecision(promoted, reason, name, version, old_number, new_iou, old_iou, decision, deltas,
                                 force and promoted)

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
    new_classes, old_classes = class_names(challenger), class_names(champion)
    if new_classes is not None and old_classes is not None and new_classes != old_classes:
        return make(False, "refused", f"refused: v{version} predicts {len(new_classes)} classes "
                                      f"({', '.join(new_classes[:4])}, ...), champion v{old_number} "
                                      f"{len(old_classes)} ({', '.join(old_classes[:4])}, ...): not the same "
                                      f"classes, so the per-class guard cannot compare them; use --force")
    if new_iou <= old_iou:
        return make(False, "kept", f"kept champion v{old_number}: challenger v{version} val mIoU "
                                   f"{new_iou:.4f} <= {old_iou:.4f}")
    if deltas is None:
        return make(False, "refused", f"refused: val mIoU {new_iou:.4f} > {old_iou:.4f} (v{old_number}), but "
                                      f"{'v' + str(version) if per_class_iou(challenger) is None else 'the champion'} "
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


def decision_tags(decision: PromotionDecision, per_class_margin: float, timestamp: str) -> dict[str, str]:
    """The tags that record ``decision`` on the challenger's version (``timestamp``: ISO 8601, UTC)."""
    tags = {
        "promotion_decision": decision.decision,
        "promotion_reason": decision.reason,
        "compared_to_version": "none" if decision.previous_champion is None else str(decision.previous_champion),
        "champion_val_mean_iou": "none" if decision.champion_iou is None else repr(decision.champion_iou),
        "challenger_val_mean_iou": "none" if decision.challenger_iou is None else repr(decision.challenger_iou),
        "promotion_timestamp": timestamp,
        "promotion_forced": str(decision.forced).lower(),
        "per_class_margin": repr(per_class_margin),
    }
    tags.update({DELTA_PREFIX + re.sub(r"[^\w\-. /]", "_", cls): f"{delta:+.6f}"
                 for cls, delta in (decision.per_class_delta or {}).items()})
    return tags
