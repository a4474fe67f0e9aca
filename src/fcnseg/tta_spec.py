"""Test-time augmentation settings, torch-free (served models read them too): which scales, whether to flip.

A setting comes from the ``conf/tta/`` config group (``--tta mmseg``, DVC ``-S tta=mmseg``) or, where there is no
config tree (a served model), from ``$FCNSEG_TTA``: a preset name or ``"0.5,1,1.5+flip"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fcnseg.errors import ConfigError

TTA_ENV = "FCNSEG_TTA"


@dataclass(frozen=True)
class TTASpec:
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.scales != (1.0,) or self.flip

    @property
    def passes(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    @classmethod
    def make(cls, scales, flip) -> "TTASpec":
        try:
            values = tuple(float(s) for s in scales)
        except (TypeError, ValueError):
            raise ConfigError(f"tta.scales must be a list of numbers, got {scales!r}") from None
        if not values or any(not 0.05 <= s <= 8 for s in values):
            raise ConfigError(f"tta.scales must be a non-empty list of scales in [0.05, 8], got {list(values)}")
        return cls(values, bool(flip))


# The conf/tta/ presets, for where the config tree is absent (tests check they equal the YAML files)
PRESETS = {"none": TTASpec(), "flip": TTASpec((1.0,), True),
           "mmseg": TTASpec((0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True)}


def parse_tta(text: str | None) -> TTASpec:
    """A preset name (none, flip, mmseg) or ``"0.5,1,1.5"`` with an optional ``+flip``."""
    text = (text or "none").strip()
    if text in PRESETS:
        return PRESETS[text]
    scales, _, flip = text.partition("+")
    if flip not in ("", "flip"):
        raise ConfigError(f"TTA {text!r}: expected a preset ({', '.join(PRESETS)}) or scales like '0.5,1,1.5+flip'")
    return TTASpec.make([s for s in scales.split(",") if s.strip()], bool(flip))


def tta_from_env() -> TTASpec:
    return parse_tta(os.environ.get(TTA_ENV))
