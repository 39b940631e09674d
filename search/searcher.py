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

Every answer to Optuna carries the trial's constraint values (``Trial.set_constraint``;
see ``constraints.py``),
and a trial that early stopping ended is told as complete, with the figures it was
measured at and its ``stopped_early`` attribute: its accuracy is under
``min_accuracy``, so it is infeasible, and the sampler learns to avoid its region.
"""

from __future__ import annotations

import warnings
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from netshrink.techniques import Pipeline

from .constraints import Constraints

MAX_REPEATS_IN_A_ROW = 100
REPEAT_OF = "repeat_of"  # user attribute of a repeat's Optuna trial: the number of the trial it repeats
UNCOMPRESSED = "uncompressed"  # user attribute of an Optuna trial that drew the baseline, answered with its figures

STOPPED_ATTR = "stopped_early"  # user attribute of an Optuna trial that early stopping ended: the share of fine-tuning done
Evaluated = dict[str, tuple[int, dict[str, float]]]  # recipe -> (Optuna trial number, its logged metrics)


def annotate(trial, metrics: dict[str, float], constraints: Constraints | None) -> None:
    """What an answered Optuna trial carries: its constraint values, and how far it got if stopped early."""
    if constraints is not None:
        for name, value in constraints.violations(metrics).items():
            trial.set_constraint(name, value)
    if metrics.get(STOPPED_ATTR):
        trial.set_user_attr(STOPPED_ATTR, metrics["stopped_at_fraction"])


class DistinctPipelineSearch(OptunaSearch):
    def __init__(
        self,
        *args: Any,
        baseline_metrics: dict[str, float],
        constraints: Constraints | None = None,
        skip_repeats: bool = True,
        evaluated: Evaluated | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
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
        recipe = self._recipe_of_trial.pop(trial_id, None)
        measured = bool(result) and not error and all(metric in result for metric in self.metric)
        if measured:
            annotate(self._ot_trials[trial_id], result, self.constraints)
            if recipe is not None:
                self._finished.setdefault(recipe, (self._ot_trials[trial_id].number, dict(result)))
        super().on_trial_complete(trial_id, result=result, error=error)
