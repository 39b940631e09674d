"""The task's metric: what "good" means for the user's model, computed on a whole split, higher is better.

Built in: ``accuracy`` (top-1), ``top5`` and ``f1_macro`` (the unweighted mean of the per-class
F1 scores over the classes present in the targets or the predictions, as scikit-learn's
``f1_score(average="macro")``). Or the user's ``module:fn(outputs, targets) -> float``, given
the logits of the whole split (``N x classes``) and its targets.

Every figure comes with a 95% interval. Where the metric is a share of samples answered right
(accuracy, top-5) it is Wilson's score interval (``netshrink.stats``). Otherwise it is a seeded
percentile bootstrap: the split's samples are drawn with replacement ``BOOTSTRAP_RESAMPLES`` times,
the metric computed on each draw, and the 2.5th and 97.5th percentiles of those values taken
(Efron and Tibshirani, 1993). Seeded, so the same predictions always give the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from netshrink.stats import wilson_interval

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
MetricFn = Callable[[torch.Tensor, Any], float]


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return int((logits.argmax(dim=-1) == targets).sum()) / len(targets) if len(targets) else 0.0  # exact, as correct / count


def top5(logits: torch.Tensor, targets: torch.Tensor) -> float:
    k = min(5, logits.shape[-1])
    hits = (logits.topk(k, dim=-1).indices == targets.reshape(-1, 1)).any(dim=-1)
    return int(hits.sum()) / len(targets) if len(targets) else 0.0


def f1_macro(logits: torch.Tensor, targets: torch.Tensor) -> float:
    predictions = logits.argmax(dim=-1)
    classes = torch.unique(torch.cat([targets.reshape(-1), predictions.reshape(-1)]))
    scores = []
    for label in classes:
        predicted, actual = predictions == label, targets == label
        true_positive = float((predicted & actual).sum())
        denominator = float(predicted.sum()) + float(actual.sum())
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


# name -> (function, whether it is a share of samples: Wilson's interval applies)
BUILTIN_METRICS: dict[str, tuple[MetricFn, bool]] = {"accuracy": (accuracy, True), "top5": (top5, True), "f1_macro": (f1_macro, False)}


@dataclass(frozen=True)
class Metric:
    """A named metric: ``name`` is what every table, plot, model card and MLflow run calls it."""

    name: str
    fn: MetricFn
    proportion: bool  # a share of samples (Wilson's interval); else bootstrap

    def __call__(self, logits: torch.Tensor, targets: Any) -> float:
        value = self.fn(logits, targets)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"task.metric {self.name!r} returned {type(value).__name__}, not a number")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"task.metric {self.name!r} returned {value}")
        return value

    def interval(self, logits: torch.Tensor, targets: Any, value: float | None = None) -> tuple[float, float]:
        """The 95% interval of the metric on these predictions (see the module docstring)."""
        count = len(logits)
        value = self(logits, targets) if value is None else value
        if self.proportion and 0.0 <= value <= 1.0:
            return wilson_interval(value, count)
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        values = []
        for _ in range(BOOTSTRAP_RESAMPLES):
            index = torch.from_numpy(rng.integers(0, count, count))
            picked = targets[index] if isinstance(targets, torch.Tensor) else [targets[i] for i in index.tolist()]
            values.append(self(logits[index], picked))
        low, high = np.percentile(values, [2.5, 97.5])
        return float(low), float(high)


def builtin_metric(name: str) -> Metric:
    fn, proportion = BUILTIN_METRICS[name]
    return Metric(name=name, fn=fn, proportion=proportion)


def metric_name(reference: str) -> str:
    """The name a metric is shown under: a built-in's name, or a user function's name (``mymetrics:macro_f1`` -> ``macro_f1``)."""
    return reference.rpartition(":")[2]


def interval_metrics(metric: Metric, prefix: str, logits: torch.Tensor, targets: Any, value: float) -> dict[str, float]:
    """``{prefix}_ci_low`` and ``{prefix}_ci_high``, as logged next to ``prefix`` (``f1_macro``, ``test_f1_macro``)."""
    low, high = metric.interval(logits, targets, value)
    return {f"{prefix}_ci_low": low, f"{prefix}_ci_high": high}
