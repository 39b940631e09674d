import json

import optuna

from netshrink.search.front import TrialPoint, dominates, front_json, pareto_front

DIRECTIONS = ["max", "min", "min"]
OBJECTIVES = ["accuracy", "size_bytes", "latency_ms"]


def point(name, accuracy, size, latency):
    return TrialPoint(run_id=name, name=name, accuracy=accuracy, size_bytes=size, latency_ms=latency, recipe='{"steps": []}', summary="")


def test_dominance_respects_directions():
    assert dominates([0.9, 10, 1], [0.8, 10, 1], DIRECTIONS)
    assert not dominates([0.9, 10, 1], [0.9, 10, 1], DIRECTIONS)
    assert not dominates([0.9, 20, 1], [0.8, 10, 1], DIRECTIONS)


def test_front_matches_optuna_best_trials_on_random_points():
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    points = []
    rng = optuna.samplers.RandomSampler(seed=0)
    study_sampler = optuna.create_study(sampler=rng)
    for i in range(60):
        t = study_sampler.ask()
        values = [round(t.suggest_float("a", 0.5, 1.0), 2), round(t.suggest_float("s", 1, 100)), round(t.suggest_float("l", 0.1, 1.0), 1)]
        study_sampler.tell(t, 0)
        study.add_trial(optuna.trial.create_trial(values=values, params={}, distributions={}, user_attrs={"name": str(i)}))
        points.append(point(str(i), *values))
    ours = {p.name for p in pareto_front(points, OBJECTIVES, DIRECTIONS)}
    theirs = {t.user_attrs["name"] for t in study.best_trials}
    assert ours == theirs


def test_min_accuracy_excludes_points_and_json_has_the_fields():
    points = [point("a", 0.99, 100, 1.0), point("b", 0.80, 10, 0.1)]
    assert [p.name for p in pareto_front(points, OBJECTIVES, DIRECTIONS)] == ["a", "b"]
    assert [p.name for p in pareto_front(points, OBJECTIVES, DIRECTIONS, min_accuracy=0.9)] == ["a"]
    rows = json.loads(front_json(points, {"size_bytes": 1000.0, "latency_ms": 2.0, "accuracy": 0.99}))
    assert {"run_id", "accuracy", "size_bytes", "latency_ms", "recipe"} <= set(rows[0])
    assert rows[1]["size_ratio"] == 100.0 and rows[1]["speedup"] == 20.0
