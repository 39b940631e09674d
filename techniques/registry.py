"""The explicit list of techniques: adding one is a module plus one line here."""

from __future__ import annotations

from typing import Any

from .base import Technique
from .clustering import Clustering
from .distillation import Distillation
from .early_exit import EarlyExit
from .lowrank import LowRank
from .pruning import Pruning
from .quantization import Quantization
from .separable import Separable
from .slimmable import Slimmable

REGISTRY: dict[str, Technique] = {
    technique.kind: technique
    for technique in (
        Separable(),
        LowRank(),
        EarlyExit(),
        Slimmable(),
        Distillation(),
        Pruning(),
        Quantization(),
        Clustering(),
    )
}


def exclusion(kind_a: str, kind_b: str) -> str | None:
    """Why techniques ``kind_a`` and ``kind_b`` cannot both be active (``Technique.excludes``), or None if they can."""
    for one, other in ((kind_a, kind_b), (kind_b, kind_a)):
        technique = REGISTRY[one]
        if other in technique.excludes:
            return technique.exclusion_reason or f"{one} excludes {other}"
    return None


def conflicts(kinds: list[str]) -> list[tuple[str, str, str]]:
    """Every pair of ``kinds`` that cannot both be active, with the reason."""
    found = []
    for i, kind_a in enumerate(kinds):
        for kind_b in kinds[i + 1 :]:
            reason = exclusion(kind_a, kind_b)
            if reason is not None:
                found.append((kind_a, kind_b, reason))
    return found


def compresses(kind: str) -> bool:
    """Whether technique ``kind`` makes a model smaller or faster by itself (``Technique.compresses``)."""
    return REGISTRY[kind].compresses


def knob_applies(kind: str, knob: str, values: dict[str, Any]) -> bool:
    """Whether ``knob`` of technique ``kind`` means anything given the other ``values`` (``Technique.conditions``)."""
    conditions = REGISTRY[kind].conditions
    return all(values.get(field) == wanted for field, wanted in conditions.get(knob, {}).items())
