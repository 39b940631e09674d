"""Ray's OptunaSearch, minus the wasted trials.

A multi-objective sampler on a small budget proposes the same pipeline again
and again (NSGA-II bred the same int8-only pipeline 9 times in a 32-trial
search: with pruning off, that corner of the space has two points). A recipe is
deterministic under the search's seed, so training it again teaches nothing.
This searcher tells Optuna the earlier result for a repeat (the study keeps a
complete trial, its ``repeat_of`` attribute naming the original) and asks for
another pipeline; Tune never sees the repeat, and the trial budget counts
distinct pipelines. If the sampler proposes nothing new many times in a row,
the space is exhausted and the search ends. A resumed search hands in the
pipelines its interrupted run finished (``evaluated``), so they count as well.

A pipeline whose every step is a no-op (a lone ``quantization(bits=32)``: the
space turns the last technique on when all others are off, but cannot stop it
drawing its no-op value) is the uncompressed baseline, measured once per
search: Optuna is told the baseline's figures (``uncompressed`` attribute) and
no trial is spent on it.

With multi-fidelity (``moasha.py``), a trial that MO-ASHA stops at a rung is told with its figures at that
rung, flagged by its ``rung_epochs`` attribute (epochs of fine-tuning it was measured after) and ``rung_of`` (its
rung, of how many), so the sampler learns from it as a measured, if under-trained, model.

Two more jobs of the driver live here, because the searcher sees every result and starts every trial:

- **the stop rule's calibration**: each result carries the trial's curve, ``Recovery`` pools what fine-tuning
  recovered, and each new trial gets the table as it stands (``trial.RECOVERY_KEY``);
- **a time budget** (``Deadline``): no trial starts that the time left cannot fit at the pace measured so far,
  keeping the time refinement will take.

Every answer to Optuna carries the trial's constraint values (``Trial.set_constraint``;
see ``constraints.py``),
and a trial that early stopping ended is told as complete, with the figures it was
measured at and its ``stopped_early`` attribute: its accuracy is under
``min_accuracy``, so it is infeasible, and the sampler learns to avoid its region.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from netshrink.deploy.evaluate import RUNG_METRIC
from netshrink.deploy.stopping import Recovery
from netshrink.techniques import Pipeline

from .constraints import Constraints
from .trial import CURVE_KEY, FINAL_KEY, OPERATING_WIDTH, RECOVERY_KEY

MAX_REPEATS_IN_A_ROW = 100
REPEAT_OF = "repeat_of"  # user attribute of a repeat's Optuna trial: the number of the trial it repeats
UNCOMPRESSED = "uncompressed"  # user attribute of an Optuna trial that drew the baseline, answered with its figures

STOPPED_ATTR = "stopped_early"  # user attribute of an Optuna trial that early stopping ended: the share of fine-tuning done
RUNG_ATTR = RUNG_METRIC  # user attribute of an Optuna trial answered with the figures of a rung before the last (MO-ASHA stopped it)
Evaluated = dict[str, tuple[int, dict[str, float]]]  # recipe -> (Optuna trial number, its logged metrics)


def annotate(trial, metrics: dict[str, float], constraints: Constraints | None) -> None:
    """What an answered Optuna trial carries: its constraint values, how far it got if stopped early, its rung if
    its figures are a rung's before the last, and the width its values are of for a slimmable trial."""
    if constraints is not None:
        for name, value in constraints.violations(metrics).items():
            trial.set_constraint(name, value)
    if metrics.get(STOPPED_ATTR):
        trial.set_user_attr(STOPPED_ATTR, metrics["stopped_at_fraction"])
    if RUNG_METRIC in metrics and not metrics.get(FINAL_KEY) and not metrics.get(STOPPED_ATTR):
        trial.set_user_attr(RUNG_ATTR, metrics[RUNG_METRIC])
        trial.set_user_attr("rung_of", metrics.get("rung_of", 0.0))
    if OPERATING_WIDTH in metrics:  # a slimmable trial: its values are this width's (``trial.as_judged``)
        trial.set_user_attr(OPERATING_WIDTH, metrics[OPERATING_WIDTH])


# The most of a time budget that refinement keeps. Refining a front point fine-tunes it refine.epochs (15 by default,
# 5x a trial's 3): on LeNet-5 under 1.5 minutes, two rounds of it left 19 s for the trials, 4 trials and none of the
# informed start. Past this share the refinement is trimmed to the points that fit.
REFINE_SHARE = 1 / 3


@dataclass
class Deadline:
    """A wall-clock budget: ``end`` (``time.time()``) for the whole search. A trial starts only if the mean wall time of the
    trials ended so far still fits before ``end`` once the refinement's share is kept: ``refine_rounds`` rounds of a
    refined point, each the measured overhead of a trial (export, measurement) plus ``refine_epochs`` epochs at the
    measured seconds per epoch of fine-tuning (``reserve``)."""

    end: float
    refine_rounds: int = 0
    refine_epochs: int = 0
    budget: float = math.inf  # the budget's seconds: refinement keeps at most REFINE_SHARE of them
    started: dict[str, float] = field(default_factory=dict)  # Tune trial id -> when it was suggested
    durations: list[float] = field(default_factory=list)  # wall seconds of each ended trial, as the driver saw it
    epoch_seconds: list[float] = field(default_factory=list)  # seconds per epoch of fine-tuning, per ended trial
    overheads: list[float] = field(default_factory=list)  # a trial's seconds besides fine-tuning
    refined: list[float] = field(default_factory=list)  # per ended trial, what refining it would take (``refined_seconds``)
    refused: bool = False  # a trial was refused for lack of time: the search has ended its trials

    def refined_point(self) -> float | None:
        """Seconds a refined point is expected to take: the 90th percentile, over the trials so far, of what refining
        each would take (refinement picks the front's points, often the larger, slower models: on the built-in ViT the
        median underestimated them by half). None before a trial has fine-tuned a whole epoch."""
        return high(self.refined) if self.refined else None

    def refined_seconds(self, metrics: dict[str, float], epochs: int | None = None) -> float | None:
        """Seconds refining the trial with these ``metrics`` should take: its own overhead plus its fine-tuning rounds
        (``fine_tune_rounds``: iterative pruning fine-tunes between its steps, and refinement lengthens every round; on
        the built-in ViT a 3-step pruning took 62 s to refine where one round was planned, 27 s) of ``epochs`` (default
        ``refine_epochs``) each, at its own pace: on LeNet-5 the front's points fine-tuned at 0.4 to 3.2 s an epoch, and
        the slow end of every trial left no room for any. The search's ``refined_point`` where the trial reported neither."""
        epochs = self.refine_epochs if epochs is None else epochs
        fine, total, trained = metrics.get("seconds_fine_tuning"), metrics.get("seconds_trial"), metrics.get("epochs_trained")
        if fine is None or total is None or not trained or trained < 1:
            point = self.refined_point()
            return None if point is None else point * epochs / max(1, self.refine_epochs)
        return max(0.0, total - fine) + fine / trained * metrics.get("fine_tune_rounds", 1.0) * epochs

    def epochs_fitting(self, metrics: dict[str, float], now: float | None = None) -> int:
        """The most epochs of refinement of this trial that end before ``end`` (0 when not even one does)."""
        left = self.end - (time.time() if now is None else now)
        one, two = self.refined_seconds(metrics, 1), self.refined_seconds(metrics, 2)
        if one is None or two is None or one > left:
            return 0
        per_epoch = max(two - one, 1e-9)
        return int((left - (one - per_epoch)) // per_epoch)

    def fitting(self, seconds: list[float | None], concurrency: int, now: float | None = None) -> list[int]:
        """Which refinements of these expected ``seconds`` (best first) end before ``end``, ``concurrency`` at a time,
        each started on the first free slot: best first, passing over one that does not fit for a shorter one after it;
        an unknown cost counts as nothing."""
        left = self.end - (time.time() if now is None else now)
        slots = [0.0] * max(1, concurrency)
        chosen = []
        for index, cost in enumerate(seconds):
            slot = min(range(len(slots)), key=slots.__getitem__)
            if slots[slot] + (cost or 0.0) <= left:
                slots[slot] += cost or 0.0
                chosen.append(index)
        return chosen

    def reserve(self) -> float:
        """The seconds kept for refinement: its rounds of a refined point, at most ``REFINE_SHARE`` of the budget (what
        does not fit is trimmed: ``tuning.refine_front``)."""
        if not self.refine_rounds or not self.refine_epochs:
            return 0.0
        point = self.refined_point()
        if point is None:
            wanted = math.inf if not self.durations else self.refine_rounds * max(self.durations) * 3  # no measure yet: keep plenty
        else:
            wanted = self.refine_rounds * point
        return min(wanted, REFINE_SHARE * self.budget)

    def allows(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if not self.durations:
            return now < self.end  # nothing measured yet: a first trial starts if any time is left
        return now + statistics.fmean(self.durations) + self.reserve() <= self.end

    def ended(self, trial_id: str, result: dict | None) -> None:
        begun = self.started.pop(trial_id, None)
        if begun is None:
            return
        self.durations.append(time.time() - begun)
        if not result:
            return
        # the pure fine-tuning seconds where the trial reports them (``FINE_TUNING_METRIC``), else compression included
        training, total = result.get("seconds_fine_tuning", result.get("seconds_training")), result.get("seconds_trial")
        epochs = result.get("epochs_trained")
        if training is not None and total is not None and epochs and epochs >= 1:  # a trial stopped in its first epoch says little
            self.epoch_seconds.append(training / epochs)
            self.overheads.append(max(0.0, total - training))
            self.refined.append(max(0.0, total - training) + training / epochs * result.get("fine_tune_rounds", 1.0) * self.refine_epochs)


def high(values: list[float], share: float = 0.9) -> float:
    """The ``share`` quantile of ``values`` (the largest for fewer than 10)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class DistinctPipelineSearch(OptunaSearch):
    def __init__(
        self,
        *args: Any,
        baseline_metrics: dict[str, float],
        constraints: Constraints | None = None,
        skip_repeats: bool = True,
        evaluated: Evaluated | None = None,
        recovery: Recovery | None = None,
        deadline: Deadline | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.recovery = recovery  # None: no early stopping, nothing to calibrate
        self.deadline = deadline
        self.skip_repeats = skip_repeats
        self.baseline_metrics = baseline_metrics  # the figures of the uncompressed model
        self.constraints = constraints
        self.repeats_skipped = 0
        self.baselines_skipped = 0
        self._recipe_of_trial: dict[str, str] = {}
        self._finished: Evaluated = dict(evaluated or {})

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        if isinstance(self._metric, list) and self._ot_study.metric_names is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental in some Optuna releases
                self._ot_study.set_metric_names(list(self._metric))  # optuna-dashboard shows "accuracy", not "values_0"

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.deadline is not None and not self.deadline.allows():
            self.deadline.refused = True
            return Searcher.FINISHED
        config = self._suggest_distinct(trial_id)
        if isinstance(config, dict):
            if self.recovery is not None:
                config[RECOVERY_KEY] = [list(row) for row in self.recovery.table()]
            if self.deadline is not None:
                self.deadline.started[trial_id] = time.time()
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._calibrate(trial_id, result)
        super().on_trial_result(trial_id, result)

    def _calibrate(self, trial_id: str, result: dict | None) -> None:
        """The trial's curve into the recovery table, unless the stop rule ended it (its curve was cut by the rule itself)."""
        if self.recovery is None or not result or CURVE_KEY not in result or result.get(STOPPED_ATTR):
            return
        try:
            curve = json.loads(result[CURVE_KEY])
        except (TypeError, ValueError):
            return
        self.recovery.add(trial_id, curve)

    def _suggest_distinct(self, trial_id: str) -> dict | str | None:
        for _ in range(MAX_REPEATS_IN_A_ROW):
            config = super().suggest(trial_id)
            if not isinstance(config, dict):
                return config
            if not Pipeline.from_recipe(config["recipe"]).active_steps():
                answered = self._ot_trials.pop(trial_id)
                answered.set_user_attr(UNCOMPRESSED, True)
                self._tell(answered, self.baseline_metrics)
                self.baselines_skipped += 1
                continue
            earlier = self._finished.get(config["recipe"]) if self.skip_repeats else None
            if earlier is None:
                self._recipe_of_trial[trial_id] = config["recipe"]
                return config
            number, metrics = earlier
            repeat = self._ot_trials.pop(trial_id)
            repeat.set_user_attr(REPEAT_OF, number)
            self._tell(repeat, metrics)
            self.repeats_skipped += 1
        return Searcher.FINISHED

    def _tell(self, trial, metrics: dict[str, float]) -> None:
        """Tell Optuna a trial's objectives, with its constraint values and whether it was stopped early."""
        annotate(trial, metrics, self.constraints)
        self._ot_study.tell(trial, [metrics[name] for name in self.metric])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._calibrate(trial_id, None if error else result)
        if self.deadline is not None:
            self.deadline.ended(trial_id, None if error else result)
        recipe = self._recipe_of_trial.pop(trial_id, None)
        measured = bool(result) and not error and all(metric in result for metric in self.metric)
        if measured:
            annotate(self._ot_trials[trial_id], result, self.constraints)
            if recipe is not None:
                self._finished.setdefault(recipe, (self._ot_trials[trial_id].number, dict(result)))
        super().on_trial_complete(trial_id, result=result, error=error)
