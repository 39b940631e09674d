import json

import optuna
import pytest

from netshrink.search.constraints import Constraints
from netshrink.search.front import TrialPoint, dominates, front_json, pareto_front, print_front

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


def test_constraints_exclude_points_and_json_has_the_fields():
    points = [point("a", 0.99, 100, 1.0), point("b", 0.80, 10, 0.1)]
    assert [p.name for p in pareto_front(points, OBJECTIVES, DIRECTIONS)] == ["a", "b"]
    assert [p.name for p in pareto_front(points, OBJECTIVES, DIRECTIONS, Constraints(min_accuracy=0.9))] == ["a"]
    assert [p.name for p in pareto_front(points, OBJECTIVES, DIRECTIONS, Constraints(min_accuracy=0.5, max_size_bytes=50))] == ["b"]
    assert [p.name for p in pareto_front(points, OBJECTIVES, DIRECTIONS, Constraints(min_accuracy=0.5, max_latency_ms=0.05))] == []
    rows = json.loads(front_json(points, {"size_bytes": 1000.0, "latency_ms": 2.0, "accuracy": 0.99}))
    assert {"run_id", "accuracy", "size_bytes", "latency_ms", "recipe"} <= set(rows[0])
    assert rows[1]["size_ratio"] == 100.0 and rows[1]["speedup"] == 20.0


def test_a_trial_whose_onnx_file_lost_the_metric_is_infeasible_and_off_the_front():
    # a BERT with static int8 activations scored 99.8% in torch and 32.6% as its model.onnx: what ships is the ONNX file
    faithful, broken = point("faithful", 0.97, 100, 1.0), point("broken", 0.998, 10, 0.1)
    faithful.extra["onnx_accuracy"], broken.extra["onnx_accuracy"] = 0.968, 0.326
    constraints = Constraints(min_accuracy=0.9)
    assert constraints.violations(broken.metrics())["min_accuracy"] == pytest.approx(0.9 - 0.326)
    assert not constraints.feasible(broken.metrics()) and constraints.feasible(faithful.metrics())
    assert [p.name for p in pareto_front([faithful, broken], OBJECTIVES, DIRECTIONS, constraints)] == ["faithful"]
    # a search that logged no ONNX figure is judged on the torch one, as before
    assert constraints.feasible(point("old", 0.95, 10, 0.1).metrics())


def test_every_accuracy_shown_carries_its_split_and_its_95_percent_interval(tmp_path):
    from rich.console import Console

    from netshrink.search.model_card import CardFacts, render_card
    from netshrink.search.plots import _tooltip
    from netshrink.config import TaskConfig
    from netshrink.stats import interval_metrics

    baseline = {"accuracy": 0.975, "test_accuracy": 0.9667, "size_bytes": 1000.0, "latency_ms": 2.0, "val_samples": 360.0, "test_samples": 360.0}
    baseline |= interval_metrics("accuracy", 0.975, 360) | interval_metrics("test_accuracy", 0.9667, 360)
    extra = {"test_accuracy": 0.95} | interval_metrics("accuracy", 0.9722, 360) | interval_metrics("test_accuracy", 0.95, 360)
    trial = TrialPoint("r", "trial-001", 0.9722, 100.0, 1.0, "{}", "quantization(bits=8)", extra)
    low, high = extra["test_accuracy_ci_low"], extra["test_accuracy_ci_high"]
    assert (round(low, 4), round(high, 4)) == (0.9224, 0.9681)  # Wilson, 342 of 360, by hand: 0.94525 -/+ 0.02289
    shown = f"95.00% [{low:.1%}, {high:.1%}]"

    console = Console(width=250, record=True)
    print_front([trial], baseline, title="t", console=console)
    text = console.export_text()
    assert "val. accuracy [95% CI]" in text and "test accuracy [95% CI]" in text and shown in text
    assert "validation split (360 samples) selected this front" in text and "test split (360 samples)" in text and "quote it" in text

    [row] = json.loads(front_json([trial], baseline))
    assert row["selection_split"] == "validation" and row["test_accuracy"] == 0.95
    assert row["test_accuracy_ci95"] == [low, high] and row["accuracy_ci95"] == [extra["accuracy_ci_low"], extra["accuracy_ci_high"]]

    tooltip = _tooltip(trial, baseline, on_front=True)
    assert f"test accuracy {shown} (held out: quote this)" in tooltip and "validation accuracy 97.22% [" in tooltip

    facts = CardFacts(
        experiment="e", search_run_id="s", point=trial, pick="as the knee", baseline=baseline, onnx_accuracy=0.9722,
        files={"model.onnx": 10}, task=TaskConfig(), search_path=str(tmp_path), inputs=(("input", "float32", (1, 1, 28, 28)),),
    )
    card = render_card(facts)
    assert f"| accuracy, test split (held out: quote this) | 96.67% [" in card and shown in card
    assert "| accuracy, validation split (selected this model) | 97.50% [" in card and "95% Wilson intervals" in card


def test_a_point_measured_at_a_rung_before_the_last_says_so_in_the_front_table():
    from rich.console import Console

    from search.front import TrialPoint, front_table

    at_rung = TrialPoint("r1", "trial-003", 0.95, 100.0, 1.0, "{}", "pruning", {"rung_index": 1.0, "rung_of": 3.0})
    full = TrialPoint("r2", "trial-004", 0.96, 200.0, 1.0, "{}", "pruning", {"rung_index": 3.0, "rung_of": 3.0})
    console = Console(width=300, record=True)
    console.print(front_table([at_rung, full], None, "front"))
    text = console.export_text()
    assert "trial-003 (rung 1/3)" in text and "trial-004 (rung" not in text


SLIMMABLE = {  # a slimmable trial's logged metrics: the widest's as its own, every width's under width_<w>/
    "accuracy": 0.97, "test_accuracy": 0.96, "size_bytes": 1000.0, "latency_ms": 0.10, "widths": 3.0,
    "width_0.25/accuracy": 0.90, "width_0.25/test_accuracy": 0.89, "width_0.25/latency_ms": 0.02,
    "width_0.5/accuracy": 0.95, "width_0.5/test_accuracy": 0.94, "width_0.5/latency_ms": 0.04,
    "width_1/accuracy": 0.97, "width_1/test_accuracy": 0.96, "width_1/latency_ms": 0.10,
}


def test_a_slimmable_trial_has_figures_per_width_and_is_judged_by_the_narrowest_width_that_meets_the_constraints():
    from netshrink.search.front import operating_point, width_figures
    from netshrink.search.trial import OPERATING_WIDTH, as_judged

    widths = width_figures(SLIMMABLE)
    assert [w for w, _ in widths] == [0.25, 0.5, 1.0]
    assert widths[1][1] == {"accuracy": 0.95, "test_accuracy": 0.94, "latency_ms": 0.04, "size_bytes": 1000.0}  # the artifact's size, shared
    assert operating_point(SLIMMABLE, Constraints(min_accuracy=0.93))[0] == 0.5
    assert operating_point(SLIMMABLE, Constraints(min_accuracy=0.99))[0] == 1.0  # none feasible: the widest
    judged = as_judged(SLIMMABLE, Constraints(min_accuracy=0.93))
    assert (judged["accuracy"], judged["latency_ms"], judged[OPERATING_WIDTH]) == (0.95, 0.04, 0.5)
    assert as_judged({"accuracy": 0.9, "size_bytes": 1.0, "latency_ms": 1.0}, None) == {"accuracy": 0.9, "size_bytes": 1.0, "latency_ms": 1.0}


def test_each_width_is_a_point_its_size_marked_shared_and_the_table_keeps_a_trials_widths_together(capsys):
    from netshrink.search.front import WIDTH_KEY, series_together

    widths = [
        TrialPoint(run_id="slim", name=f"trial-001@{w:g}", accuracy=a, size_bytes=1000.0, latency_ms=l, recipe='{"steps": []}', summary="", extra={WIDTH_KEY: w})
        for w, a, l in ((0.25, 0.90, 0.02), (0.5, 0.95, 0.04), (1.0, 0.97, 0.10))
    ]
    other = point("other", 0.96, 500.0, 0.05)
    front = pareto_front([*widths, other], OBJECTIVES, DIRECTIONS)
    assert {p.name for p in front} == {"trial-001@1", "other", "trial-001@0.5", "trial-001@0.25"}
    assert [p.name for p in series_together(front)] == ["trial-001@1", "trial-001@0.5", "trial-001@0.25", "other"]
    print_front(front, None, "front")
    out = capsys.readouterr().out
    assert "(shared)" in out and "trial@w: the width w of a slimmable trial" in out
    rows = json.loads(front_json(front, None))
    assert all(row.get("shares_artifact") is True for row in rows if row["name"].startswith("trial-001@"))
