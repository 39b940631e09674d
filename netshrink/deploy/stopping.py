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
validation accuracy, from a checkpoint at a given share of fine-tuning to the end of
fine-tuning, seen over calibration trials on the built-in task (``RECOVERY``, measured
by ``benchmarks/stopping.py``), plus a margin. A trial whose accuracy plus that rise
stays under ``min_accuracy`` is stopped (never before fine-tuning has begun: the grace); the trial then measures the model as it stands
and the searcher tells Optuna, as a complete but infeasible trial, so the sampler learns
where the hopeless region is (see ``searcher.py``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

# (share of the trial's fine-tuning done, the largest rise of validation accuracy from a checkpoint in
# [share, next share) to the end of fine-tuning): measured by benchmarks/evidence.py (part "curves") over 60
# pipelines drawn at random from the default space of spaces/digits.yaml, 3 fine-tuning epochs each. The
# rise is not monotone: iterative pruning's later steps dip the accuracy at a round's start, and the
# next round recovers it (the 0.5 entry). From 0.17 the largest rise seen was 2.5 points over 25 checkpoints:
# the entry keeps 10, as its neighbours.
RECOVERY: tuple[tuple[float, float], ...] = ((0.0, 0.42), (0.08, 0.18), (0.17, 0.10), (0.25, 0.11), (0.33, 0.075), (0.5, 0.225))
# No decision before fine-tuning starts (the 0.0 entry is for the record): a structural technique can leave a
# model at chance that a few steps of fine-tuning bring back (low-rank on a ViT's every Linear), and a table
# measured on one task cannot promise the contrary for another. From the first checkpoint on, the curve shows it.
# On top of the largest rise seen: one task and 60 trials are not every model. Before low-rank stopped
# factoring the output layer, its broken models sat at chance for a quarter of their fine-tuning and then
# climbed up to 60 points; none of them ended above min_accuracy, and of the trials that did, none rose more
# than 6.1 points from a quarter of the way.
MARGIN = 0.10
FIRST_SHARE = 0.25  # checkpoints every quarter epoch while the trial is in this first share of its fine-tuning
QUARTERS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Checkpoint:
    fraction: float  # share of the trial's whole fine-tuning done, 0 to 1
    epochs: float  # epochs of fine-tuning done, over all rounds
    accuracy: float  # validation accuracy of the model at this point


@dataclass(frozen=True)
class StopRule:
    """Stop a trial that cannot end at or above ``min_accuracy``, judged by the largest recovery seen."""

    min_accuracy: float  # the floor of the task's metric
    recovery: tuple[tuple[float, float], ...] = RECOVERY
    margin: float = MARGIN
    metric: str = "accuracy"

    def largest_rise(self, fraction: float) -> float:
        shares = [share for share, _ in self.recovery]
        return self.recovery[max(bisect.bisect_right(shares, fraction) - 1, 0)][1]

    def reason(self, point: Checkpoint) -> str | None:
        """Why the trial should stop at ``point``, or None if it may go on."""
        if point.fraction >= 1.0 or point.fraction <= 0.0:
            return None  # fine-tuning is over (the trial is measured as any other), or has not started (the grace)
        reach = point.accuracy + self.largest_rise(point.fraction) + self.margin
        if reach >= self.min_accuracy:
            return None
        return (
            f"validation {self.metric} {point.accuracy:.1%} after {point.fraction:.0%} of fine-tuning: even the largest recovery "
            f"seen from there (+{self.largest_rise(point.fraction):.0%}, +{self.margin:.0%} margin) stays under min_{self.metric} {self.min_accuracy:.1%}"
        )


@dataclass
class FineTuneMonitor:
    """Checkpoints over a trial's fine-tuning rounds; stops it when ``rule`` says so.

    ``rounds`` x ``epochs`` is the trial's whole fine-tuning. Pass ``checkpoint`` and
    ``checkpoints_at`` to ``netshrink.training.train`` and call ``round_done`` after each
    round. Once stopped, ``skip`` is True and later rounds do not train.
    """

    rounds: int
    epochs: int
    evaluate: Callable[[nn.Module], float]
    rule: StopRule | None = None
    report: Callable[[Checkpoint], None] | None = None
    curve: list[Checkpoint] = field(default_factory=list)
    stopped: Checkpoint | None = None
    stop_reason: str | None = None
    _round: int = 0

    @property
    def skip(self) -> bool:
        return self.stopped is not None

    def _total(self) -> int:
        return max(self.rounds * self.epochs, 1)

    def checkpoints_at(self, epoch: int) -> list[float]:
        """Within-epoch checkpoints of this round's ``epoch``: quarters while in the first share of fine-tuning."""
        started = (self._round * self.epochs + epoch) / self._total()
        return list(QUARTERS) if started < FIRST_SHARE else []

    def before_fine_tuning(self, model: nn.Module) -> bool:
        """A checkpoint at the very start (the model as the techniques left it); True if the trial stops there."""
        return self(model, 0.0) if self._round == 0 and not self.curve else False

    def __call__(self, model: nn.Module, epochs_done: float) -> bool:
        done = self._round * self.epochs + epochs_done
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
