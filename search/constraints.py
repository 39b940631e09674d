"""The search's constraints: what a model must reach to be worth shipping.

``min_accuracy`` (default: the baseline's validation accuracy minus ``DEFAULT_DROP``),
and optionally ``max_size_bytes`` and ``max_latency_ms``. They reach the sampler as Optuna constraints
(``Trial.set_constraint``, set on every trial the searcher tells; NSGA-II, TPE and GP
samplers rank infeasible trials below feasible ones, and ``Study.best_trials`` keeps
feasible ones only), so it learns where the feasible region is rather than having its
proposals filtered afterwards; the trial
tags its MLflow run ``feasible``; early stopping stops a trial that cannot reach
``min_accuracy``; and the front holds feasible points only.

The floor applies to what ships: the lower of the model's metric in torch and that of its
exported ``model.onnx`` (``onnx_<metric>``, which every trial measures on the same split).
An export that lost what the torch model scored (a faulty graph rewrite, an operator
quantized that fine-tuning never simulated) makes its trial infeasible, so the front,
the sampler and ``export --pick`` never rank it by a figure the shipped file does not have.

Each violation is a number that is positive when the constraint is broken, scaled so
that the three are comparable when NSGA-II sums them to rank infeasible trials: points
of accuracy as a fraction (0.05 = 5 points short), size and latency as the share by
which they exceed their limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_DROP = 0.05  # min_accuracy defaults to the baseline's validation accuracy minus 5 points


def shipped(metrics: dict[str, float], metric: str) -> float:
    """The metric of what ships: the lower of the torch model's figure and its ONNX file's (where measured)."""
    return min(metrics[metric], metrics.get(f"onnx_{metric}", metrics[metric]))


@dataclass(frozen=True)
class Constraints:
    min_accuracy: float  # the floor of the task's metric (``metric``; accuracy by default), on the validation split
    max_size_bytes: float | None = None
    max_latency_ms: float | None = None
    metric: str = "accuracy"

    @classmethod
    def for_search(
        cls, min_metric: float | None, max_size_bytes: float | None, max_latency_ms: float | None, baseline: dict[str, float],
        metric: str = "accuracy", max_metric_drop: float | None = None,
    ) -> "Constraints":
        """The experiment's limits. The metric's floor is the higher of ``min_metric`` and the baseline's minus
        ``max_metric_drop``; with neither given, the baseline's minus ``DEFAULT_DROP``."""
        floors = []
        if min_metric is not None:
            floors.append(min_metric)
        if max_metric_drop is not None or min_metric is None:
            floors.append(baseline[metric] - (DEFAULT_DROP if max_metric_drop is None else max_metric_drop))
        floor = max(floors)
        return cls(min_accuracy=max(floor, 0.0) if metric in ("accuracy", "top5", "f1_macro") else floor,
                   max_size_bytes=max_size_bytes, max_latency_ms=max_latency_ms, metric=metric)

    @property
    def floor_name(self) -> str:
        return f"min_{self.metric}"

    def violations(self, metrics: dict[str, float]) -> dict[str, float]:
        """Per constraint, a value that is positive where ``metrics`` break it (see the module docstring)."""
        values = {self.floor_name: self.min_accuracy - shipped(metrics, self.metric)}
        if self.max_size_bytes is not None:
            values["max_size_bytes"] = metrics["size_bytes"] / self.max_size_bytes - 1.0
        if self.max_latency_ms is not None:
            values["max_latency_ms"] = metrics["latency_ms"] / self.max_latency_ms - 1.0
        return values

    def misses(self, metrics: dict[str, float]) -> list[str]:
        """Each constraint ``metrics`` break, in words, with by how much: what the front of a search with no feasible
        trial shows next to each of the closest trials."""
        from .front import format_metric

        words = []
        for name, value in self.violations(metrics).items():
            if value <= 0:
                continue
            if name == self.floor_name:
                which = "ONNX " if metrics.get(f"onnx_{self.metric}", math.inf) < metrics[self.metric] else ""
                words.append(
                    f"{name} {format_metric(self.metric, self.min_accuracy)}: {which}validation {self.metric} {format_metric(self.metric, shipped(metrics, self.metric))}"
                    + (f", {100 * value:.1f} points short" if self.metric in ("accuracy", "top5", "f1_macro") else f", {value:.4g} short")
                )
            elif name == "max_size_bytes":
                words.append(f"max_size_bytes {self.max_size_bytes:,.0f}: {metrics['size_bytes']:,.0f} bytes, {100 * value:.0f}% over")
            else:
                words.append(f"max_latency_ms {self.max_latency_ms:g}: {metrics['latency_ms']:.4g} ms, {100 * value:.0f}% over")
        return words

    def shortfall(self, metrics: dict[str, float]) -> float:
        """The sum of the positive violations: how far from feasible, in the scaled units of ``violations``."""
        return sum(max(0.0, value) for value in self.violations(metrics).values())

    def feasible(self, metrics: dict[str, float]) -> bool:
        return all(value <= 0 for value in self.violations(metrics).values())

    def to_tags(self) -> dict[str, str]:
        """The parent run's record of the constraints (read back by ``from_tags``)."""
        return {
            "metric": self.metric,
            self.floor_name: repr(self.min_accuracy),
            "max_size_bytes": "" if self.max_size_bytes is None else repr(self.max_size_bytes),
            "max_latency_ms": "" if self.max_latency_ms is None else repr(self.max_latency_ms),
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "Constraints | None":
        """The constraints a search ran under, from its parent run; None for a search that recorded none."""
        metric = tags.get("metric", "accuracy")
        if not tags.get(f"min_{metric}"):
            return None
        optional = {name: float(tags[name]) if tags.get(name) else None for name in ("max_size_bytes", "max_latency_ms")}
        return cls(min_accuracy=float(tags[f"min_{metric}"]), metric=metric, **optional)

    def describe(self) -> str:
        from .front import format_metric

        parts = [f"validation {self.metric} >= {format_metric(self.metric, self.min_accuracy)}"]
        if self.max_size_bytes is not None:
            parts.append(f"size <= {self.max_size_bytes:,.0f} bytes")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        return ", ".join(parts)
