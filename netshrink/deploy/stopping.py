"""Stopping hopeless trials early, from inside the trial.

A trial fine-tunes its compressed model in one or more *rounds* (iterative pruning
fine-tunes between its steps, then once more at the end). ``FineTuneMonitor`` follows
the trial's progress over all its rounds as a fraction of its whole fine-tuning, takes
the validation accuracy at checkpoints (after each epoch; every quarter epoch while the
trial is in the first quarter of its fine-tuning; and once before fine-tuning starts),
hands each checkpoint to a reporter (the trial logs them to MLflow and Ray Tune), and
asks a ``StopRule`` whether the trial can still reach the useful region.

Why here and not in Optuna or Ray: Optuna's pruners do not support multi-objective
studies (``Trial.report`` raises there), and Ray Tune's schedulers (ASHA, median
stopping) rank trials by one metric, while a trial's worth is a point in accuracy x size
x latency, and a small model at 93% may be worth more than a large one at 97%. What
every trial shares is ``min_accuracy``: a model under it is never on the front. So the
rule asks one question, from the trial's own curve: can this trial still end at or
above ``min_accuracy``? The answer comes from measured recovery: the largest rise of
validation accuracy, from a checkpoint at a given share of fine-tuning to the trial's last
checkpoint, seen **in this search's own trials** (``Recovery``: the searcher collects each
trial's curve and hands every new trial the table as it stands), plus a margin. Until a
share has ``MIN_CURVES`` trials behind it, the rule assumes the conservative prior
``PRIOR_RISE``: any rise at all (100 points), so no trial is stopped from a share that the
search has not yet seen recover. Measured, not assumed: on a small residual CNN with BatchNorm
(``benchmarks/quality_models.py``), channel pruning at 0.35 left the model at chance (10%) after
a twelfth of its fine-tuning and it ended at 91.1%, 81 points higher; a 50-point prior (more
than LeNet-5's largest rise, 42 points, plus that table's 10-point margin) stopped it. A trial whose accuracy plus the allowance
stays under ``min_accuracy`` is stopped (never before fine-tuning has begun: the grace); the
trial then measures the model as it stands and the searcher tells Optuna, as a complete but
infeasible trial, so the sampler learns where the hopeless region is (see ``searcher.py``).

The table once measured on LeNet-5 (``LENET5_RECOVERY``, ``benchmarks/evidence.py`` part
"curves") is kept for the record and that benchmark; no search uses it.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

# For the record: (share of fine-tuning done, the largest rise of validation accuracy from there to the end) over 60
# pipelines drawn at random from spaces/digits.yaml, 3 epochs each, with a margin of 0.10 on top (benchmarks/evidence.py).
LENET5_RECOVERY: tuple[tuple[float, float], ...] = ((0.0, 0.42), (0.08, 0.18), (0.17, 0.10), (0.25, 0.11), (0.33, 0.075), (0.5, 0.225))
LENET5_MARGIN = 0.10

# The calibrated rule: shares of a trial's fine-tuning at which recovery is pooled, the prior, and how much evidence
# replaces it. The margin covers what a handful of curves has not shown yet.
SHARES: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75)
PRIOR_RISE = 1.0
MIN_CURVES = 5
MARGIN = 0.05
FIRST_SHARE = 0.25  # checkpoints every quarter epoch while the trial is in this first share of its fine-tuning
QUARTERS = (0.25, 0.5, 0.75)

RecoveryTable = tuple[tuple[float, float, int], ...]  # (share, allowance with its margin, trials behind it: 0 for the prior)


@dataclass
class Recovery:
    """What fine-tuning recovered in one search's trials, pooled by share of fine-tuning done.

    ``add`` takes a trial's curve (``(share, value)`` pairs in order); each checkpoint's rise is the
    trial's last value minus the value there (a trial measured at a rung and stopped there: its rise to that
    rung, a lower bound of what longer fine-tuning would give, which the margin covers). A trial that the stop
    rule itself ended is left out by the caller: its curve was cut by the rule being calibrated.
    """

    rises: dict[float, list[float]] = field(default_factory=lambda: {share: [] for share in SHARES})  # share -> each trial's largest rise
    _by_trial: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, trial: str, curve: list[tuple[float, float]]) -> None:
        self._by_trial[trial] = [(float(a), float(b)) for a, b in curve]
        self.rises = {share: [] for share in SHARES}
        for points in self._by_trial.values():
            last, largest = points[-1][1] if points else 0.0, {}
            for share, value in points[:-1]:  # per trial, its largest rise from each share: the table counts trials
                largest[bucket(share)] = max(largest.get(bucket(share), -1.0), last - value)
            for share, rise in largest.items():
                self.rises[share].append(rise)

    def table(self) -> RecoveryTable:
        rows = []
        for share in SHARES:
            seen = self.rises[share]
            rows.append((share, max(0.0, max(seen)) + MARGIN, len(seen)) if len(seen) >= MIN_CURVES else (share, PRIOR_RISE, 0))
        return tuple(rows)


def allowance(table: RecoveryTable, fraction: float) -> tuple[float, int]:
    """The rise ``table`` allows from ``fraction`` of fine-tuning done, and the trials behind it (0: the prior)."""
    shares = [row[0] for row in table]
    _, rise, curves = table[max(bisect.bisect_right(shares, fraction) - 1, 0)]
    return rise, curves


def bucket(share: float) -> float:
    return SHARES[max(bisect.bisect_right(SHARES, share) - 1, 0)]


def encode_curve(curve: list["Checkpoint"]) -> str:
    """A curve as one result value (JSON of ``[share, value]`` pairs): Tune carries it to the searcher."""
    return json.dumps([[round(point.fraction, 4), round(point.accuracy, 6)] for point in curve])


@dataclass(frozen=True)
class Checkpoint:
    fraction: float  # share of the trial's whole fine-tuning done, 0 to 1
    epochs: float  # epochs of fine-tuning done, over all rounds
    accuracy: float  # validation accuracy of the model at this point


@dataclass(frozen=True)
class StopRule:
    """Stop a trial that cannot end at or above ``min_accuracy``, judged by the recovery seen in this search (``Recovery``)."""

    min_accuracy: float  # the floor of the task's metric
    recovery: RecoveryTable = tuple((share, PRIOR_RISE, 0) for share in SHARES)
    metric: str = "accuracy"

    def allowance(self, fraction: float) -> tuple[float, int]:
        return allowance(self.recovery, fraction)

    def reason(self, point: Checkpoint) -> str | None:
        """Why the trial should stop at ``point``, or None if it may go on."""
        if point.fraction >= 1.0 or point.fraction <= 0.0:
            return None  # fine-tuning is over (the trial is measured as any other), or has not started (the grace)
        rise, curves = self.allowance(point.fraction)
        if point.accuracy + rise >= self.min_accuracy:
            return None
        seen = (
            f"the largest recovery {curves} of this search's trials showed from there (+{rise:.0%} with the {MARGIN:.0%} margin)"
            if curves else f"the conservative prior (+{rise:.0%}) that holds until {MIN_CURVES} of this search's trials show what fine-tuning recovers"
        )
        return f"validation {self.metric} {point.accuracy:.1%} after {point.fraction:.0%} of fine-tuning: even {seen} stays under min_{self.metric} {self.min_accuracy:.1%}"


@dataclass
class FineTuneMonitor:
    """Checkpoints over a trial's fine-tuning rounds; stops it when ``rule`` says so.

    Every round but the last fine-tunes ``epochs``; the last ``last_epochs`` (default ``epochs``; a
    multi-fidelity trial's last round runs to its last rung). Pass ``checkpoint`` and ``checkpoints_at`` to
    ``netshrink.training.train`` and call ``round_done`` after each round. Once stopped, ``skip`` is True and
    later rounds do not train.
    """

    rounds: int
    epochs: int
    evaluate: Callable[[nn.Module], float]
    rule: StopRule | None = None
    report: Callable[[Checkpoint], None] | None = None
    last_epochs: int | None = None
    curve: list[Checkpoint] = field(default_factory=list)
    stopped: Checkpoint | None = None
    stop_reason: str | None = None
    _round: int = 0

    @property
    def skip(self) -> bool:
        return self.stopped is not None

    @property
    def final_epochs(self) -> int:
        return self.epochs if self.last_epochs is None else self.last_epochs

    def _total(self) -> int:
        return max((self.rounds - 1) * self.epochs + self.final_epochs, 1) if self.rounds else 1

    def round_epochs(self) -> int:
        """Epochs of the round now running."""
        return self.final_epochs if self._round >= self.rounds - 1 else self.epochs

    def _done(self, epochs_done: float) -> float:
        return self._round * self.epochs + epochs_done

    def checkpoints_at(self, epoch: int) -> list[float]:
        """Within-epoch checkpoints of this round's ``epoch``: quarters while in the first share of fine-tuning."""
        started = self._done(epoch) / self._total()
        return list(QUARTERS) if started < FIRST_SHARE else []

    def before_fine_tuning(self, model: nn.Module) -> bool:
        """A checkpoint at the very start (the model as the techniques left it); True if the trial stops there."""
        return self(model, 0.0) if self._round == 0 and not self.curve else False

    def __call__(self, model: nn.Module, epochs_done: float) -> bool:
        done = self._done(epochs_done)
        point = Checkpoint(fraction=min(done / self._total(), 1.0), epochs=done, accuracy=self.evaluate(model))
        self.curve.append(point)
        if self.report is not None:
            self.report(point)
        reason = self.rule.reason(point) if self.rule is not None else None
        if reason is not None:
            self.stopped, self.stop_reason = point, reason
        return reason is not None

    def round_done(self) -> None:
        self._round += 1

    @property
    def round(self) -> int:
        """Fine-tuning rounds finished so far."""
        return self._round

    def last_value(self) -> float | None:
        """The validation metric at the latest checkpoint (None before the first)."""
        return self.curve[-1].accuracy if self.curve else None
