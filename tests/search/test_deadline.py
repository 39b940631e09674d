"""A budget in time: the searcher's Deadline starts a trial only if it fits, keeping the refinement's share."""

import math

import pytest

from netshrink.config import Experiment
from search.runner import time_budget
from search.searcher import Deadline


def ended(deadline: Deadline, trial: str, began: float, now: float, result: dict, monkeypatch) -> None:
    deadline.started[trial] = began
    monkeypatch.setattr("search.searcher.time.time", lambda: now)
    deadline.ended(trial, result)


def test_the_first_trial_starts_while_any_time_is_left_and_later_ones_only_if_the_measured_pace_fits(monkeypatch):
    deadline = Deadline(end=100.0)
    assert deadline.allows(now=99.0) and not deadline.allows(now=100.0)
    ended(deadline, "a", 0.0, 20.0, {"seconds_training": 10.0, "seconds_trial": 18.0, "epochs_trained": 2.0}, monkeypatch)
    assert deadline.allows(now=80.0)  # 80 + 20 s a trial fits
    assert not deadline.allows(now=81.0)


def test_the_refinements_share_is_its_rounds_of_overhead_plus_its_epochs_at_the_measured_pace(monkeypatch):
    deadline = Deadline(end=1000.0, refine_rounds=2, refine_epochs=15)
    assert deadline.reserve() == math.inf  # nothing measured: keep everything until a trial shows the pace
    ended(deadline, "a", 0.0, 10.0, {"seconds_training": 6.0, "seconds_trial": 9.0, "epochs_trained": 3.0}, monkeypatch)
    # a refined point: 3 s of overhead + 15 epochs at 2 s; two rounds of them
    assert deadline.reserve() == 2 * (3.0 + 15 * 2.0)
    assert deadline.allows(now=1000.0 - 10.0 - 66.0) and not deadline.allows(now=1000.0 - 10.0 - 65.0)


def test_a_time_budget_in_the_experiment_file_makes_the_deadline_and_a_search_without_one_has_none():
    timed = Experiment.model_validate(
        {"name": "x", "space": {"pruning": None}, "search": {"budget": {"minutes": 2}}, "refine": {"epochs": 10, "count": 3}}
    )
    deadline = time_budget(timed, started=500.0, concurrency=2)
    assert deadline.end == 620.0 and deadline.refine_rounds == 2 and deadline.refine_epochs == 10
    assert timed.search.trial_budget is None  # only the time limits it
    assert time_budget(Experiment.model_validate({"name": "x", "space": {"pruning": None}}), started=0.0, concurrency=2) is None


def test_a_budget_is_minutes_or_hours_and_the_trial_count_is_given_once():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="minutes or as hours"):
        Experiment.model_validate({"name": "x", "space": {"pruning": None}, "search": {"budget": {"minutes": 2, "hours": 1}}})
    with pytest.raises(ValidationError, match="give the trial count once"):
        Experiment.model_validate({"name": "x", "space": {"pruning": None}, "search": {"trials": 3, "budget": {"hours": 1, "trials": 4}}})
    both = Experiment.model_validate({"name": "x", "space": {"pruning": None}, "search": {"trials": 3, "budget": {"hours": 1}}})
    assert both.search.trial_budget == 3 and both.search.seconds == 3600.0


def test_the_refined_points_pace_is_the_slow_end_of_the_trials_and_ignores_trials_stopped_in_their_first_epoch(monkeypatch):
    deadline = Deadline(end=1000.0, refine_rounds=1, refine_epochs=10)
    for index, per_epoch in enumerate([1.0, 1.0, 1.0, 4.0]):  # the front's big model is the slow one refinement will pick
        ended(deadline, f"t{index}", 0.0, 10.0, {"seconds_training": 2 * per_epoch, "seconds_trial": 2 * per_epoch + 1.0, "epochs_trained": 2.0}, monkeypatch)
    ended(deadline, "stopped", 0.0, 1.0, {"seconds_training": 3.0, "seconds_trial": 3.5, "epochs_trained": 0.25}, monkeypatch)
    assert deadline.refined_point() == 1.0 + 4.0 * 10  # not the median's 1 s an epoch, and not 12 s from the quarter-epoch trial


def test_the_pace_is_the_pure_fine_tuning_time_where_a_trial_reports_it(monkeypatch):
    deadline = Deadline(end=1000.0, refine_rounds=1, refine_epochs=10)
    # 9 s before measuring, of which 3 s fine-tuning 3 epochs (the rest: compression and the first rung's measurement)
    ended(deadline, "a", 0.0, 12.0, {"seconds_fine_tuning": 3.0, "seconds_training": 9.0, "seconds_trial": 11.0, "epochs_trained": 3.0}, monkeypatch)
    assert deadline.epoch_seconds == [1.0] and deadline.overheads == [8.0]
    assert deadline.refined_point() == 8.0 + 10 * 1.0


def test_refinement_keeps_at_most_a_third_of_the_budget(monkeypatch):
    from search.searcher import REFINE_SHARE

    deadline = Deadline(end=90.0, refine_rounds=2, refine_epochs=15, budget=90.0)
    assert deadline.reserve() == REFINE_SHARE * 90.0  # nothing measured: a third, not everything
    ended(deadline, "a", 0.0, 6.0, {"seconds_fine_tuning": 6.0, "seconds_training": 6.5, "seconds_trial": 7.0, "epochs_trained": 3.0}, monkeypatch)
    assert deadline.refined_point() == 1.0 + 15 * 2.0 and deadline.reserve() == 30.0  # 2 rounds of 31 s capped at 30 s
    assert deadline.allows(now=90.0 - 30.0 - 6.0) and not deadline.allows(now=90.0 - 30.0 - 5.0)


def test_refinement_plans_each_point_at_its_own_trials_pace_and_takes_the_points_that_fit_best_first():
    deadline = Deadline(end=100.0, refine_rounds=2, refine_epochs=15)
    ended_trial = {"seconds_fine_tuning": 9.6, "seconds_training": 10.0, "seconds_trial": 15.6, "epochs_trained": 3.0}  # 3.2 s an epoch
    deadline.started["slow"] = 0.0
    deadline.ended("slow", ended_trial)
    quick = {"seconds_fine_tuning": 1.2, "seconds_trial": 5.2, "epochs_trained": 3.0}  # 0.4 s an epoch, 4 s besides
    assert deadline.refined_seconds(quick) == pytest.approx(4.0 + 0.4 * 15)
    assert deadline.refined_seconds({}) == deadline.refined_point() == pytest.approx(6.0 + 3.2 * 15)  # a trial that reported no pace
    # 35 s left, 2 at a time: 10 s and 10 s on the two slots, 20 s after the first; 30 s after the second would end at 40 s
    assert deadline.fitting([10.0, 10.0, 20.0, 30.0], concurrency=2, now=65.0) == [0, 1, 2]
    assert deadline.fitting([40.0, 1.0], concurrency=2, now=65.0) == [1]  # one that does not fit is passed over for a shorter one
    assert deadline.fitting([None, None], concurrency=1, now=99.0) == [0, 1]


def test_a_point_fine_tuned_in_several_rounds_is_refined_in_as_many_and_the_epochs_that_fit_are_counted():
    deadline = Deadline(end=100.0, refine_rounds=1, refine_epochs=15)
    # iterative pruning in 3 steps: 3 fine-tunings of 3 epochs, 2 s an epoch; refined, 3 fine-tunings of 15 epochs
    three_rounds = {"seconds_fine_tuning": 18.0, "seconds_trial": 21.0, "epochs_trained": 9.0, "fine_tune_rounds": 3.0}
    assert deadline.refined_seconds(three_rounds) == pytest.approx(3.0 + 2.0 * 3 * 15)
    # 40 s left: 3 s besides and 6 s an epoch over the 3 rounds: 6 epochs fit (39 s), 7 do not
    assert deadline.epochs_fitting(three_rounds, now=60.0) == 6
    assert deadline.epochs_fitting(three_rounds, now=96.0) == 0
    deadline.started["t"] = 0.0
    deadline.ended("t", three_rounds)
    assert deadline.refined_point() == pytest.approx(3.0 + 2.0 * 3 * 15)  # the forecast counts the rounds too
