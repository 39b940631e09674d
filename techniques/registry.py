"""The explicit list of techniques: adding one is a module plus one line here."""

from __future__ import annotations

from .base import Technique
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
    )
}


def get_technique(kind: str) -> Technique:
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown technique {kind!r}; known: {', '.join(sorted(REGISTRY))}") from None
