"""MO-ASHA's ranking and its decisions at a rung (the scheduler alone; the end-to-end search is in test_multi_fidelity.py)."""

from ray.tune.schedulers import TrialScheduler

from netshrink.config import Experiment, MultiFidelity
from search.constraints import Constraints
from search.moasha import DECISION_TAG, MF_STOPPED_TAG, MultiObjectiveASHA, rank_order

OBJECTIVES, DIRECTIONS = ["accuracy", "size_bytes", "latency_ms"], ["max", "min", "min"]


def result(accuracy, size, latency=1.0, epochs=1, run="r"):
    return {"accuracy": accuracy, "size_bytes": size, "latency_ms": latency, "rung_epochs": float(epochs), "mlflow_run_id": run}


def test_rank_order_puts_the_feasible_first_front_by_front_and_the_infeasible_by_violation():
    values = [[0.9, 10, 1], [0.95, 20, 1], [0.8, 30, 1], [0.99, 5, 1], [0.99, 1, 1]]
    violations = [0.0, 0.0, 0.0, 0.2, 0.1]
    order = rank_order(values, DIRECTIONS, violations)
    assert order[:2] in ([0, 1], [1, 0])  # the non-dominated feasible pair
    assert order[2] == 2  # dominated by both
    assert order[3:] == [4, 3]  # infeasible last, the smaller violation first, though they dominate everything


def test_the_first_trial_at_a_rung_goes_on_and_the_top_third_of_those_seen_go_on_after():
    logged = {}
    scheduler = MultiObjectiveASHA(OBJECTIVES, DIRECTIONS, [1, 3, 9], 3.0, "accuracy", log=lambda run, tags: logged.update({run: tags}))
    assert scheduler.decide("a", result(0.90, 100, run="ra")) == TrialScheduler.CONTINUE  # alone at its rung
    assert scheduler.decide("b", result(0.80, 200, run="rb")) == TrialScheduler.STOP  # dominated by a
    assert scheduler.decide("c", result(0.95, 50, run="rc")) == TrialScheduler.CONTINUE  # dominates both
    assert "promoted at rung 1" in logged["ra"][DECISION_TAG] and logged["rb"][MF_STOPPED_TAG] == "true"
    assert "ranked 3 of 3" in logged["rb"][DECISION_TAG] or "ranked 2 of 2" in logged["rb"][DECISION_TAG]
    # rungs are separate: the first at rung 3 goes on, whatever rung 1 held
    assert scheduler.decide("a", result(0.5, 1000, epochs=3, run="ra")) == TrialScheduler.CONTINUE
    assert scheduler.decide("a", result(0.5, 1000, epochs=9, run="ra")) == TrialScheduler.CONTINUE  # the last rung: the trial ends by itself
    # a trial that early stopping ended after 0.75 epochs reports once, at no rung: it is neither ranked nor recorded
    assert scheduler.decide("d", {**result(0.1, 10, epochs=0.75, run="rd"), "stopped_early": 1.0}) == TrialScheduler.CONTINUE
    assert scheduler.decide("e", {**result(0.1, 10, epochs=1, run="re"), "final": 1.0}) == TrialScheduler.CONTINUE
    assert "d" not in scheduler.recorded[1] and "e" not in scheduler.recorded[1] and "rd" not in logged


def test_a_trial_under_the_floor_by_less_than_the_recovery_still_expected_is_not_cut_for_it():
    constraints = Constraints(min_accuracy=0.9)
    strict = MultiObjectiveASHA(OBJECTIVES, DIRECTIONS, [1, 3], 3.0, "accuracy", constraints=constraints)
    lenient = MultiObjectiveASHA(OBJECTIVES, DIRECTIONS, [1, 3], 3.0, "accuracy", constraints=constraints, allowance=lambda share: 0.1)
    for scheduler in (strict, lenient):
        scheduler.decide("big", result(0.95, 1000))
        scheduler.decide("other", result(0.96, 2000))
    # 86% after one epoch, the smallest by far: under the floor, but 0.1 of recovery still expected lifts it over
    assert strict.decide("small", result(0.86, 10)) == TrialScheduler.STOP
    assert lenient.decide("small", result(0.86, 10)) == TrialScheduler.CONTINUE


def test_the_rungs_follow_min_epochs_and_the_reduction_factor_up_to_finetune_epochs():
    on = MultiFidelity(enabled=True)
    assert on.epochs(9) == (1, 3, 9) and on.epochs(3) == (1, 3)
    assert on.epochs(1) == () and MultiFidelity(enabled=False).epochs(9) == ()
    assert MultiFidelity(rungs=[2, 4]).epochs(9) == (2, 4, 9)
    # the default, auto: on from three rungs; two (1 and 3 epochs) paid on no benchmark model
    assert MultiFidelity().epochs(3) == () and MultiFidelity().epochs(9) == (1, 3, 9) and MultiFidelity().epochs(15) == (1, 3, 9, 15)
    assert MultiFidelity(rungs=[1, 2]).epochs(3) == (1, 2, 3)  # rungs written out are what the user asks for
    auto = Experiment.model_validate({"name": "x", "space": {"pruning": None}, "search": {"multi_fidelity": "auto"}, "finetune": {"epochs": 3}})
    assert auto.rungs() == () and auto.search.multi_fidelity.enabled == "auto"
    experiment = Experiment.model_validate({"name": "x", "space": {"pruning": None}, "search": {"multi_fidelity": False}, "finetune": {"epochs": 9}})
    assert experiment.rungs() == ()


def test_a_resumed_search_ranks_new_trials_against_the_rungs_its_earlier_trials_reached():
    from types import SimpleNamespace as NS

    histories = {  # run -> metric -> [(step, value)]
        "r1": {"accuracy": [(1, 0.95), (3, 0.97)], "size_bytes": [(1, 50.0), (3, 50.0)], "latency_ms": [(1, 1.0), (3, 1.0)]},
        "r2": {"accuracy": [(1, 0.96)], "size_bytes": [(1, 40.0)], "latency_ms": [(1, 1.0)]},
    }
    runs = [NS(info=NS(run_id=run, status="FINISHED"), data=NS(tags={})) for run in histories]
    client = NS(get_metric_history=lambda run, name: [NS(step=s, value=v) for s, v in histories[run].get(name, [])])
    tracker = NS(trial_runs=lambda experiment_id, parent: runs, client=client)
    scheduler = MultiObjectiveASHA(OBJECTIVES, DIRECTIONS, [1, 3, 9], 3.0, "accuracy")
    assert scheduler.restore(tracker, "e", "p") == 3  # r1 at rungs 1 and 3, r2 at rung 1
    assert set(scheduler.recorded[1]) == {"r1", "r2"} and set(scheduler.recorded[3]) == {"r1"}
    # a new trial dominated by both at rung 1 no longer goes on as the first one there would
    assert scheduler.decide("new", result(0.90, 100)) == TrialScheduler.STOP
