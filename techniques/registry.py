"""The explicit list of techniques: adding one is a module plus one line here."""

from __future__ import annotations

from .base import Technique
from .clustering import Clustering
from .distillation import Distillation
from .lowrank import LowRank
from .pruning import Pruning
from .quantization import Quantization
from .separable import Separable

REGISTRY: dict[str, Technique] = {
    technique.kind: technique
    for technique in (
        Separable(),
        LowRank(),
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
        if other in getattr(technique, "excludes", frozenset()):
            return getattr(technique, "exclusion_reason", f"{one} excludes {other}")
    return None


def get_technique(kind: str) -> Technique:
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown technique {kind!r}; known: {', '.join(sorted(REGISTRY))}") from None
