"""The explicit list of techniques: adding one is a module plus one line here."""

from __future__ import annotations

from .base import Technique
from .pruning import Pruning
from .quantization import Quantization

REGISTRY: dict[str, Technique] = {
    technique.kind: technique
    for technique in (
        Pruning(),
        Quantization(),
    )
}


def get_technique(kind: str) -> Technique:
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown technique {kind!r}; known: {', '.join(sorted(REGISTRY))}") from None
