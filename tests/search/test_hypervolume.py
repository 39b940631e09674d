import itertools
import random

import pytest

from netshrink.search.front import TrialPoint
from netshrink.search.hypervolume import front_hypervolume, hypervolume, hypervolume_history, losses

ALL = ["accuracy", "size_bytes", "latency_ms"]
BASELINE = {"accuracy": 0.9, "size_bytes": 1000.0, "latency_ms": 2.0}


def point(name, accuracy, size, latency):
    return TrialPoint(run_id=name, name=name, accuracy=accuracy, size_bytes=size, latency_ms=latency, recipe="{}", summary="")


def test_staircase_in_2d_by_hand():
    # unit cells under the staircase (1,3) (2,2) (3,1) up to (4,4): 1 + 2 + 3
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (4, 4)) == pytest.approx(6.0)
    assert hypervolume([(3, 1), (1, 3), (2, 2)], (4, 4)) == pytest.approx(6.0)  # order does not matter


def test_dominated_and_repeated_points_add_nothing():
    front = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume(front + [(3, 3), (2, 2), (3.5, 3.5)], (4, 4)) == pytest.approx(6.0)
    assert hypervolume([(0.5, 0.5, 0.5), (0.6, 0.9, 0.5), (0.5, 0.5, 0.5)], (1, 1, 1)) == pytest.approx(0.125)


def test_points_outside_or_on_the_reference_box_add_nothing():
    assert hypervolume([(0, 5), (5, 0), (0, 4), (4, 0)], (4, 4)) == 0.0
    assert hypervolume([(1, 3), (0, 5)], (4, 4)) == pytest.approx(3.0)
    assert hypervolume([(5, 0)], (4, 4)) == 0.0
    assert hypervolume([(2, 0, 0), (0.5, 0.5, 0.5)], (1, 1, 1)) == pytest.approx(0.125)
    assert hypervolume([], (1, 1, 1)) == 0.0


def test_boxes_in_3d_by_inclusion_exclusion():
    assert hypervolume([(0, 0, 0.5), (0.5, 0.5, 0)], (1, 1, 1)) == pytest.approx(0.5 + 0.25 - 0.125)
    # three boxes of 0.25, each pair and all three overlapping in the cube [0.5, 1]^3
    assert hypervolume([(0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)], (1, 1, 1)) == pytest.approx(3 * 0.25 - 3 * 0.125 + 0.125)


def test_one_objective_is_the_distance_from_the_best_point_to_the_reference():
    assert hypervolume([(0.3,), (0.1,), (2.0,)], (1.0,)) == pytest.approx(0.9)


@pytest.mark.parametrize("seed", range(5))
def test_3d_matches_counting_unit_cells_on_integer_points(seed):
    rng = random.Random(seed)
    points = [tuple(rng.randrange(6) for _ in range(3)) for _ in range(12)]
    reference = (5, 5, 5)
    covered = sum(
        any(all(p <= c for p, c in zip(point, cell)) for point in points)
        for cell in itertools.product(range(5), repeat=3)  # the cell [c, c+1]^3 is covered when a point is at or below c
    )
    assert hypervolume(points, reference) == pytest.approx(covered)


def test_losses_are_normalised_against_the_baseline_with_reference_one():
    p = point("a", 0.8, 500.0, 1.0)
    assert losses(p, ALL, BASELINE) == pytest.approx((0.2, 0.25, 0.25))
    assert losses(p, ALL, BASELINE, min_accuracy=0.5) == pytest.approx((0.4, 0.25, 0.25))
    assert losses(p, ["latency_ms", "accuracy"], BASELINE) == pytest.approx((0.25, 0.2))
    assert front_hypervolume([p], ALL, BASELINE) == pytest.approx(0.8 * 0.75 * 0.75)
    assert front_hypervolume([p], ALL, BASELINE, min_accuracy=0.5) == pytest.approx(0.6 * 0.75 * 0.75)


def test_only_the_objectives_in_use_count():
    slow = point("slow", 0.8, 500.0, 5.0)  # over twice the baseline latency: outside the box on that axis
    assert front_hypervolume([slow], ALL, BASELINE) == 0.0
    assert front_hypervolume([slow], ["accuracy", "size_bytes"], BASELINE) == pytest.approx(0.8 * 0.75)


def test_points_below_min_accuracy_add_nothing():
    assert front_hypervolume([point("weak", 0.7, 100.0, 0.5)], ALL, BASELINE, min_accuracy=0.75) == 0.0


def test_history_is_non_decreasing_and_ends_at_the_volume_of_all_points():
    rng = random.Random(7)
    points = [point(f"t{i}", rng.uniform(0.5, 1.0), rng.uniform(100, 2500), rng.uniform(0.5, 5.0)) for i in range(40)]
    history = hypervolume_history(points, ALL, BASELINE)
    assert len(history) == len(points)
    assert all(later >= earlier for earlier, later in zip(history, history[1:]))
    assert history[-1] == pytest.approx(front_hypervolume(points, ALL, BASELINE))
    assert history[-1] > history[0]


def test_history_stays_flat_for_dominated_points():
    good, worse = point("good", 0.9, 200.0, 1.0), point("worse", 0.8, 300.0, 1.5)
    first = front_hypervolume([good], ALL, BASELINE)
    assert hypervolume_history([good, worse, good], ALL, BASELINE) == pytest.approx([first, first, first])
    assert hypervolume_history([worse, good], ALL, BASELINE)[1] == pytest.approx(first)


def _point(name, accuracy, size, latency):
    return TrialPoint(name, name, accuracy, size, latency, "{}", name)


BASE = {"accuracy": 0.97, "size_bytes": 1000.0, "latency_ms": 1.0}
OBJECTIVES = ["accuracy", "size_bytes", "latency_ms"]


def test_refinement_picks_what_would_add_most_if_brought_to_the_baseline_accuracy():
    from netshrink.search.hypervolume import most_to_gain

    accurate_but_slow = _point("slow", 0.975, 30.0, 1.0)  # on the front, but above the baseline already: nothing to gain
    fast = _point("fast", 0.93, 15.0, 0.25)  # 4 points down after a few epochs, and the fastest
    fast_twin = _point("twin", 0.94, 16.0, 0.26)  # nearly the same model: once "fast" is counted, it adds nothing
    smallest = _point("small", 0.95, 10.0, 0.5)  # slower than "fast" but smaller: another part of the front
    trials = [accurate_but_slow, fast, fast_twin, smallest]
    chosen = most_to_gain(trials, trials, OBJECTIVES, BASE, count=4, min_accuracy=0.92)
    # "fast", then "small" (another part of the front); then, every other one dominated by those two counted at the
    # baseline's accuracy, the one that would add most to the front as measured: the twin, a hedge on "fast".
    # "slow" is above the baseline already: refining it would add nothing, so it is never chosen.
    assert [p.name for p in chosen] == ["fast", "small", "twin"]
    assert [p.name for p in most_to_gain(trials, trials, OBJECTIVES, BASE, count=1, min_accuracy=0.92)] == ["fast"]


def test_refinement_does_not_pick_a_dominated_trial_for_a_rounding_error_of_hypervolume():
    from netshrink.search.hypervolume import front_hypervolume, most_to_gain

    # a BERT search's front (every point at 100%, above the baseline's 99%) and a trial two of them dominate
    baseline = {"accuracy": 0.99, "size_bytes": 13506056.0, "latency_ms": 5.948330499904841}
    front = [
        _point("011", 1.0, 221590.0, 6.342497352231589), _point("010", 1.0, 271552.0, 6.263305847256671),
        _point("009", 1.0, 922060.0, 3.6125104780874806), _point("007", 1.0, 653732.0, 4.767102613857194),
        _point("004", 1.0, 4604520.0, 2.7031346310404727),
    ]
    dominated = _point("002", 1.0, 1746404.0, 6.2855670048194385)
    rounding = front_hypervolume([*front, dominated], OBJECTIVES, baseline, 0.94) - front_hypervolume(front, OBJECTIVES, baseline, 0.94)
    assert 0 < rounding < 1e-15  # what made it look like a gain
    assert most_to_gain([*front, dominated], front, OBJECTIVES, baseline, count=2, min_accuracy=0.94) == []


def test_refine_potential_takes_only_trials_that_meet_the_constraints(tmp_path):
    from netshrink.config import Experiment
    from netshrink.search.constraints import Constraints
    from netshrink.search.tuning import points_to_refine

    experiment = Experiment.model_validate({"name": "e", "refine": {"epochs": 1, "points": "potential", "count": 2}, "space": {"pruning": {}}})
    hopeless = _point("hopeless", 0.5, 1.0, 0.01)  # tiny and fast, but far under min_accuracy
    fine = _point("fine", 0.95, 30.0, 0.5)
    fast = _point("fast", 0.93, 50.0, 0.3)
    chosen = points_to_refine([hopeless, fine, fast], experiment, BASE, Constraints(min_accuracy=0.92))
    assert [p.name for p in chosen] == ["fast", "fine"]
    knee = experiment.model_copy(update={"refine": experiment.refine.model_copy(update={"points": "knee"})})
    assert "hopeless" not in [p.name for p in points_to_refine([hopeless, fine, fast], knee, BASE, Constraints(min_accuracy=0.92))]


def test_refine_potential_reaches_under_min_accuracy_but_keeps_every_other_constraint():
    from netshrink.config import Experiment
    from netshrink.search.constraints import Constraints
    from netshrink.search.tuning import points_to_refine

    experiment = Experiment.model_validate({"name": "e", "refine": {"epochs": 1, "points": "potential", "count": 3}, "space": {"pruning": {}}})
    assert experiment.refine.reach == 0.05
    fine = _point("fine", 0.95, 30.0, 0.5)
    close = _point("close", 0.89, 20.0, 0.2)  # 3 points under min_accuracy after a few epochs, and the fastest
    far = _point("far", 0.86, 20.0, 0.1)  # 6 points under: out of reach
    too_big = _point("too_big", 0.93, 600.0, 0.15)  # meets min_accuracy, breaks max_size_bytes: no reach helps
    constraints = Constraints(min_accuracy=0.92, max_size_bytes=500.0)
    chosen = [p.name for p in points_to_refine([fine, close, far, too_big], experiment, BASE, constraints)]
    assert chosen[0] == "close" and "fine" in chosen
    assert "far" not in chosen and "too_big" not in chosen
    strict = experiment.model_copy(update={"refine": experiment.refine.model_copy(update={"reach": 0.0})})
    assert [p.name for p in points_to_refine([fine, close, far, too_big], strict, BASE, constraints)] == ["fine"]
    # the reach counts for the ONNX file as for torch (both gain from the longer fine-tuning); a broken export does not
    close.extra["onnx_accuracy"] = 0.888
    broken = _point("broken", 0.93, 20.0, 0.05)  # the fastest of all, in torch
    broken.extra["onnx_accuracy"] = 0.33
    chosen = [p.name for p in points_to_refine([fine, close, far, too_big, broken], experiment, BASE, constraints)]
    assert chosen[0] == "close" and "broken" not in chosen
