"""Hypervolume of the Pareto front: one number for how much of the trade-off space a search has covered.

The rule, so that values are comparable between searches of the same baseline:

* Each objective the experiment uses becomes a loss to minimise, 0 at ideal and 1 at the reference point:
  - ``accuracy``:   ``(1 - accuracy) / (1 - floor)``, where ``floor`` is ``min_accuracy`` when set, else 0;
  - ``size_bytes``: ``size / (2 * baseline size)``;
  - ``latency_ms``: ``latency / (2 * baseline latency)``;
  - ``throughput``: ``baseline throughput / (2 * throughput)`` (1 at half the baseline's samples per second).
* The reference point is 1 on every used axis: accuracy at ``min_accuracy`` (or 0), twice the
  baseline's size, twice its latency. The hypervolume is the share of that unit box the front
  dominates, so it lies in [0, 1]. With all three objectives and no ``min_accuracy``, a single trial
  scores ``accuracy * (1 - size / (2 * baseline size)) * (1 - latency / (2 * baseline latency))``.
* The box reaches past the baseline (2x, not 1x) because latency is measured, not computed: a
  trial that is much smaller at unchanged speed lands a few percent either side of the baseline's
  latency, and a box ending at the baseline would count it as nothing half the time.
* A point outside the box (below ``min_accuracy``, over twice the baseline) adds nothing; so do
  dominated points. Objectives the experiment does not use are left out entirely.

The volume is computed exactly by slicing along the last objective down to a 2-D sweep, which is
O(n^2 log n) in the number of front points for three objectives; the history only recomputes it
when the front changes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from .front import TrialPoint, dominates, metric_of

Vector = tuple[float, ...]
BOX_OVER_BASELINE = 2.0  # the reference point's size and latency, in multiples of the baseline's


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Exact volume dominated by ``points`` (every objective minimised) inside the box below ``reference``."""
    inside = [tuple(point) for point in points if all(x < r for x, r in zip(point, reference))]
    return _volume(inside, tuple(reference))


def _volume(points: list[Vector], reference: Vector) -> float:
    if not points:
        return 0.0
    if len(reference) == 1:
        return reference[0] - min(point[0] for point in points)
    if len(reference) == 2:
        return _area(points, reference)
    ordered = sorted(points, key=lambda point: point[-1])
    volume = 0.0
    for index, point in enumerate(ordered):
        upper = ordered[index + 1][-1] if index + 1 < len(ordered) else reference[-1]
        if upper > point[-1]:  # the slab between this point's last coordinate and the next one's
            volume += _volume([p[:-1] for p in ordered[: index + 1]], reference[:-1]) * (upper - point[-1])
    return volume


def _area(points: list[Vector], reference: Vector) -> float:
    """2-D sweep: left to right, each point that lowers the staircase adds a strip out to the reference."""
    area, lowest = 0.0, reference[1]
    for x, y in sorted(points):
        if y < lowest:
            area += (reference[0] - x) * (lowest - y)
            lowest = y
    return area


def losses(point: TrialPoint, objectives: Sequence[str], baseline: dict[str, float], min_accuracy: float | None = None) -> Vector:
    """``point`` on the normalised axes of the module docstring (reference point: 1 on each)."""
    spread = 1.0 - (min_accuracy or 0.0)
    scaled = {
        point.metric_name: (1.0 - point.accuracy) / spread if spread > 0 else 1.0,  # min_accuracy 1: an empty box
        "size_bytes": point.size_bytes / (BOX_OVER_BASELINE * baseline["size_bytes"]),
        "latency_ms": point.latency_ms / (BOX_OVER_BASELINE * baseline["latency_ms"]),
    }
    if "onnx_bytes" in objectives:
        scaled["onnx_bytes"] = point.value("onnx_bytes") / (BOX_OVER_BASELINE * baseline["onnx_bytes"])
    if "throughput" in objectives:  # more is better: the loss is the baseline's share, the box ends at half its throughput
        scaled["throughput"] = baseline["throughput"] / (BOX_OVER_BASELINE * point.value("throughput"))
    return tuple(scaled[name] for name in objectives)


def front_hypervolume(points: Sequence[TrialPoint], objectives: Sequence[str], baseline: dict[str, float], min_accuracy: float | None = None) -> float:
    """Share of the reference box that ``points`` dominate, on the objectives the search used."""
    return hypervolume([losses(p, objectives, baseline, min_accuracy) for p in points], [1.0] * len(objectives))


def hypervolume_history(points: Sequence[TrialPoint], objectives: Sequence[str], baseline: dict[str, float], min_accuracy: float | None = None) -> list[float]:
    """Hypervolume after each of ``points`` in the given order: non-decreasing, since a point can only add."""
    reference = [1.0] * len(objectives)
    minimise = ["min"] * len(objectives)
    front: list[Vector] = []
    history: list[float] = []
    current = 0.0
    for point in points:
        new = losses(point, objectives, baseline, min_accuracy)
        if not any(old == new or dominates(old, new, minimise) for old in front):
            front = [old for old in front if not dominates(new, old, minimise)] + [new]
            current = hypervolume(front, reference)
        history.append(current)
    return history


# A gain of hypervolume at or under this is none: the volume of a front with a dominated point added differs from
# the front's by rounding (1.1e-16 on a BERT search, which then refined a dominated trial already at 100%)
NO_GAIN = 1e-12


def most_to_gain(
    candidates: Sequence[TrialPoint], front: Sequence[TrialPoint], objectives: Sequence[str], baseline: dict[str, float],
    count: int, min_accuracy: float | None = None,
) -> list[TrialPoint]:
    """At most ``count`` candidates that would add most to the hypervolume of ``front`` if longer fine-tuning brought
    their accuracy up to the baseline's, chosen greedily: each pick is counted at that accuracy when the next is
    weighed, so the picks cover different parts of the front rather than one corner. Once every candidate left is
    dominated by the picks so counted, the rest of ``count`` goes to those that would add most to ``front`` as
    measured (refinement may fall short, so a pick's near twin is a hedge); a candidate that would add nothing even
    to that is never chosen.

    Why the baseline's accuracy: a few epochs rank trials, and they rank aggressive structural compression low.
    On the built-in task, 15 epochs took distillation + channel pruning 0.75 + 4 bits from -4.4 points (after 3
    epochs) to -0.3, and channel pruning 0.65 + 4 bits from -1.4 to +0.0 (``benchmarks/evidence.py``'s kind of
    measurement; docs/search.md, "Refinement"); the fastest, smallest trials are what refinement pays for most.
    """
    ceiling = baseline[metric_of(candidates)]

    def raised(point: TrialPoint) -> TrialPoint:
        return replace(point, accuracy=max(point.accuracy, ceiling))

    def volume(points: Sequence[TrialPoint]) -> float:
        return front_hypervolume(points, objectives, baseline, min_accuracy)

    def gains(left: list[TrialPoint], over: list[TrialPoint], covered: float) -> list[tuple[float, float, int]]:
        return [(volume([*over, raised(point)]) - covered, point.accuracy, index) for index, point in enumerate(left)]

    chosen: list[TrialPoint] = []
    lifted = list(front)
    measured = volume(front)
    for _ in range(count):
        left = [point for point in candidates if point not in chosen]
        if not left:
            break
        best = max(gains(left, lifted, volume(lifted)))
        if best[0] <= NO_GAIN:
            # under the picks, nothing adds: refinement may fall short of the baseline, so hedge with the trials
            # that would add most to the front as measured (the picks' near twins among them)
            best = max(gains(left, list(front), measured))
            if best[0] <= NO_GAIN:
                break  # nothing would add anything even at the baseline's accuracy: refining buys nothing
        index = best[2]
        chosen.append(left[index])
        lifted.append(raised(left[index]))
    return chosen
