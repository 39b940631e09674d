"""Accuracy with its uncertainty: a share of correct answers on n held-out samples is an estimate.

On the built-in task one validation image is 0.28 points, so two models 0.28 apart
are one image apart. Every accuracy netshrink shows comes with a 95% Wilson score
interval (Wilson, 1927), which stays inside [0, 1] and keeps its coverage near 0%
and 100%, where the textbook p +/- 1.96 sqrt(p(1-p)/n) does not.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(accuracy: float, samples: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on ``samples`` samples."""
    if samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    centre = (accuracy + z * z / (2 * samples)) / (1 + z * z / samples)
    half = z / (1 + z * z / samples) * math.sqrt(accuracy * (1 - accuracy) / samples + z * z / (4 * samples * samples))
    return max(0.0, centre - half), min(1.0, centre + half)


def interval_metrics(name: str, accuracy: float, samples: int) -> dict[str, float]:
    """``{name}_ci_low`` and ``{name}_ci_high``, as logged next to ``name``."""
    low, high = wilson_interval(accuracy, samples)
    return {f"{name}_ci_low": low, f"{name}_ci_high": high}
