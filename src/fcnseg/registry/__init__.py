"""MLflow model registry, in parts: :mod:`~fcnseg.registry.store` (clients, URIs, retries while SQLite is locked),
:mod:`~fcnseg.registry.locks` (cross-process locks), :mod:`~fcnseg.registry.gate` (the promotion rule, a pure
function over tag dicts), :mod:`~fcnseg.registry.promotion` (moving the ``champion`` alias through the gate) and
:mod:`~fcnseg.registry.versions` (registering a version with alias ``challenger``, listing versions).

Two promotions at once leave exactly one consistent champion: the read-compare-set section runs under a lock (a
file lock next to a SQLite database; on a tracking server the registered model ``<name>.promotion-lock``), and
the alias is read back after it moves. This package re-exports the names the rest of fcnseg and its users call.
"""

from fcnseg.errors import TrackingError
from fcnseg.registry.gate import PER_CLASS_MARGIN, PromotionDecision, decide, per_class_deltas
from fcnseg.registry.promotion import CHAMPION, promote
from fcnseg.registry.store import client_for, sqlite_path
from fcnseg.registry.versions import CHALLENGER, list_versions, register_model, registered_as

__all__ = ["CHALLENGER", "CHAMPION", "PER_CLASS_MARGIN", "PromotionDecision", "TrackingError", "client_for",
           "decide", "list_versions", "per_class_deltas", "promote", "register_model", "registered_as", "sqlite_path"]
