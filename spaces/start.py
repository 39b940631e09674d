"""The informed start: the first trials of a search, chosen from measurement rather than drawn at random.

A multi-objective sampler learns from the trials it has seen. Drawn at random, the first
generation says little: most random pipelines stack several techniques at random
strengths, and when one of them breaks the model the sampler cannot tell which. So a
search starts with each technique alone at a moderate setting (what does each one
contribute?), then with combinations that measurement showed to work on the built-in
task (where is the good region?), and the sampler breeds from there.

A start point names techniques and some of their knobs; the knobs it leaves out take the
technique's default when the space allows it, else the middle of the space's range (or
its first choice). A point the user's space cannot express (a technique it leaves out or
switches off, a value outside its range) is left out, so the start never leaves the
user's space. ``start_params`` turns the points into Optuna parameters, which the
searcher enqueues (``optuna.Study.enqueue_trial``): they run first, and the sampler
sees them as trials like any other.

The evidence for each point is in docs/search.md ("The informed start"), measured by
``benchmarks/evidence.py``.
"""

from __future__ import annotations

import math
from typing import Any

from netshrink.techniques import REGISTRY

from .knobs import Choice, Fixed, Range

StartPoint = dict[str, dict[str, Any]]  # technique kind -> the knobs it sets

# Each technique alone, at a moderate setting; then combinations measured to work. The figures for each are in
# docs/search.md ("The informed start"), measured by benchmarks/evidence.py.
INFORMED_START: tuple[StartPoint, ...] = (
    {"pruning": {"granularity": "channel", "ratio": 0.35, "steps": 1, "importance": "l2"}},
    {"pruning": {"granularity": "weight", "ratio": 0.9, "steps": 2, "scope": "global"}},
    {"quantization": {"allocation": "uniform", "bits": 4}},
    {"clustering": {"allocation": "uniform", "clusters": 16, "huffman": True}},
    {"lowrank": {"rank_fraction": 0.2}},
    {"separable": {"which": "last"}},
    {"early_exit": {"threshold": 0.9}},
    {"distillation": {"temperature": 4.0, "alpha": 0.5}, "pruning": {"granularity": "channel", "ratio": 0.5, "steps": 1}},
    {"pruning": {"granularity": "channel", "ratio": 0.45, "steps": 1, "importance": "l2"}, "quantization": {"allocation": "uniform", "bits": 2}},
    {"pruning": {"granularity": "channel", "ratio": 0.65, "steps": 1, "importance": "l2"}, "quantization": {"allocation": "uniform", "bits": 4}},
    {"distillation": {"temperature": 4.0, "alpha": 0.5}, "pruning": {"granularity": "channel", "ratio": 0.75, "steps": 1, "importance": "l2"},
     "quantization": {"allocation": "uniform", "bits": 4}},
    {"pruning": {"granularity": "weight", "ratio": 0.95, "steps": 2, "scope": "global"}, "quantization": {"allocation": "uniform", "bits": 4}},
    {"pruning": {"granularity": "weight", "ratio": 0.95, "steps": 2, "scope": "global"}, "quantization": {"allocation": "sensitivity", "average_bits": 2.0}},
    {"pruning": {"granularity": "weight", "ratio": 0.95, "steps": 2, "scope": "global"}, "quantization": {"allocation": "uniform", "bits": 2}},
    # dynamic width, last: a width per budget from one artifact (docs/techniques/slimmable.md; benchmarks/slimmable.py)
    {"slimmable": {"narrowest": 0.25, "count": 4}},
)


class _Scripted:
    """An Optuna-like trial that answers a space's questions from a start point and records them."""

    def __init__(self, point: StartPoint, space) -> None:
        self.point = point
        self.space = space
        self.params: dict[str, Any] = {}

    def _answer(self, name: str, allowed) -> Any:
        kind, _, field = name.partition("/")
        if field == "enabled":
            value = kind in self.point
        elif field in self.point.get(kind, {}):
            value = self.point[kind][field]
        else:
            value = _default_within(kind, field, self.space.techniques()[kind].knobs()[field])
        if not allowed(value):
            raise _DoesNotFit(f"{name}={value!r}")
        self.params[name] = value
        return value

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self._answer(name, lambda value: value in choices)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float:
        return float(self._answer(name, lambda value: isinstance(value, (int, float)) and low <= value <= high and _on_grid(value, low, step)))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return int(self._answer(name, lambda value: isinstance(value, int) and low <= value <= high and (value - low) % step == 0))


class _DoesNotFit(Exception):
    pass


def _on_grid(value: float, low: float, step: float | None) -> bool:
    return step is None or math.isclose((value - low) / step, round((value - low) / step), abs_tol=1e-9)


def _default_within(kind: str, field: str, knob) -> Any:
    """The technique's default for ``field`` where the knob allows it, else the knob's middle."""
    default = REGISTRY[kind].config_type.model_fields[field].default
    if isinstance(knob, Fixed):
        return knob.value
    if isinstance(knob, Choice):
        return default if default in knob.options else knob.options[0]
    if isinstance(knob, Range):
        if isinstance(default, (int, float)) and not isinstance(default, bool) and knob.low <= default <= knob.high:
            return default
        middle = math.sqrt(knob.low * knob.high) if knob.log else (knob.low + knob.high) / 2
        if knob.integer:
            return int(round(middle))
        return knob.low + round((middle - knob.low) / knob.step) * knob.step if knob.step else middle
    return default


def start_params(space, points: tuple[StartPoint, ...] = INFORMED_START) -> list[dict[str, Any]]:
    """Optuna parameters (``<technique>/<knob>``) of each start point the space can express, in order."""
    found: list[dict[str, Any]] = []
    for point in points:
        trial = _Scripted(point, space)
        try:
            pipeline = space.sample(trial)
        except (_DoesNotFit, KeyError):
            continue  # the space leaves out a technique or a value this point needs
        if not set(point) <= {step.kind for step in pipeline.active_steps()}:
            continue  # a technique of the point was switched off by the space (excluded, or a no-op value)
        if trial.params not in found:
            found.append(trial.params)
    return found
