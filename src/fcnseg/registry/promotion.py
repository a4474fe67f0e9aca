"""Promotion: under the registry lock, read the challenger's and the champion's tags, ask the gate
(:func:`fcnseg.registry.gate.decide`), move the ``champion`` alias if it says so, read the alias back, and write
the decision on the challenger's version tags, so the registry itself says why the champion is what it is."""

from __future__ import annotations

from datetime import datetime, timezone

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fcnseg.errors import TrackingError
from fcnseg.registry.gate import PER_CLASS_MARGIN, PromotionDecision, decide, decision_tags
from fcnseg.registry.locks import registry_lock
from fcnseg.registry.store import as_tracking_error, retry, store_uri

CHAMPION = "champion"


def parse_version(name: str, version: int | str) -> int:
    """A version number the user typed, as a positive int, else one line saying how to list versions."""
    try:
        number = int(version)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise TrackingError(f"model version must be a positive integer, got {version!r} for {name}; "
                            f"list versions with `fcnseg models {name}`")
    return number


def get_version(client: mlflow.MlflowClient, name: str, version: int) -> ModelVersion:
    """Version ``version`` of ``name``; a missing model or version is one line saying what exists."""
    try:
        return retry(client.get_model_version, name, str(version))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    known = retry(client.search_registered_models, filter_string=f"name = '{name}'")
    where = store_uri(client)
    if not known:
        raise TrackingError(f"no registered model named {name!r} in {where}; register one with the pipeline "
                            f"(dvc repro) or check --tracking-uri")
    raise TrackingError(f"{name} has no version {version} in {where}; list versions with `fcnseg models {name}`")


def champion_version(client: mlflow.MlflowClient, name: str) -> int | None:
    """The version the ``champion`` alias points at, None when there is none."""
    aliases = retry(client.get_registered_model, name).aliases or {}
    return int(aliases[CHAMPION]) if CHAMPION in aliases else None


def promote(name: str, version: int | str, *, force: bool = False, client: mlflow.MlflowClient,
            per_class_margin: float = PER_CLASS_MARGIN) -> PromotionDecision:
    """Moves the ``champion`` alias to ``version`` if it beats the champion on the identical evaluation set
    without any class dropping by more than ``per_class_margin`` (or ``force``).

    The decision, both figures and the per-class deltas are recorded as tags of ``version``. Read, compare and
    move happen under one lock, so concurrent promotions leave one consistent champion.
    """
    number = parse_version(name, version)
    if not 0.0 <= float(per_class_margin) <= 1.0:
        raise TrackingError(f"per-class margin must be an IoU difference in [0, 1] (0.05 = 5 points), "
                            f"got {per_class_margin}")
    with as_tracking_error(f"promote {name} v{number}", client), registry_lock(client, name):
        challenger = get_version(client, name, number)
        old_number = champion_version(client, name)
        champion = None if old_number is None else get_version(client, name, old_number)
        decision = decide(name, number, challenger.tags or {}, None if champion is None else champion.tags or {},
                          old_number, force, per_class_margin)
        if decision.decision == "already_champion":
            return decision  # nothing changed; keep the record of the promotion that made it champion
        if decision.promoted:
            retry(client.set_registered_model_alias, name, CHAMPION, str(number))
            if champion_version(client, name) != number:  # re-check: someone bypassing the lock moved it
                raise TrackingError(f"champion of {name} changed while v{number} was being promoted (a promotion "
                                    f"outside fcnseg?); run `fcnseg models {name}` and promote again")
        timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for key, value in decision_tags(decision, per_class_margin, timestamp).items():
            retry(client.set_model_version_tag, name, str(number), key, value)
        return decision
