"""The searcher never hands Tune a pipeline that would waste a trial: repeats and the uncompressed baseline are answered."""

import optuna
import pytest

from netshrink.search.constraints import Constraints
from netshrink.search.tuning import SpaceSampler
from netshrink.search.searcher import REPEAT_OF, STOPPED_ATTR, UNCOMPRESSED, DistinctPipelineSearch
from netshrink.spaces import SearchSpace
from netshrink.techniques import Pipeline

BASELINE_METRICS = {"accuracy": 0.95, "size_bytes": 1_000_000.0, "latency_ms": 0.1}
BASELINE = list(BASELINE_METRICS.values())


def searcher(space: dict, seed: int = 0, sampler=None, constraints=None) -> DistinctPipelineSearch:
    return DistinctPipelineSearch(
        baseline_metrics=BASELINE_METRICS,
        constraints=constraints,
        space=SpaceSampler(SearchSpace.model_validate(space)),
        metric=["accuracy", "size_bytes", "latency_ms"],
        mode=["max", "min", "min"],
        sampler=sampler or optuna.samplers.RandomSampler(seed=seed),
    )


def test_a_draw_of_the_uncompressed_model_is_answered_with_the_baseline_and_never_trained():
    search = searcher({"quantization": {"bits": [32, 8, 16]}})
    handed = []
    for index in range(8):
        config = search.suggest(f"t{index}")
        if not isinstance(config, dict):
            break
        handed.append(Pipeline.from_recipe(config["recipe"]))
        search.on_trial_complete(f"t{index}", {"accuracy": 0.9, "size_bytes": 1000.0 + index, "latency_ms": 0.1})
    assert handed and all(pipeline.active_steps() for pipeline in handed)
    answered = [t for t in search._ot_study.trials if t.user_attrs.get(UNCOMPRESSED)]
    assert search.baselines_skipped == len(answered) > 0
    assert all(t.values == pytest.approx(BASELINE) and t.params["quantization/bits"] == 32 for t in answered)


def test_every_answer_carries_its_constraint_violations_and_the_sampler_records_them():
    """NSGA-II with the search's constraints function: measured trials, repeats and the baseline answer all carry them."""
    floor = Constraints(min_accuracy=0.9, max_size_bytes=2000.0)
    sampler = optuna.samplers.NSGAIISampler(seed=0, population_size=4)
    search = searcher({"quantization": {"bits": [32, 16, 8]}}, sampler=sampler, constraints=floor)
    results = {"16": {"accuracy": 0.95, "size_bytes": 1500.0, "latency_ms": 0.1}, "8": {"accuracy": 0.85, "size_bytes": 1000.0, "latency_ms": 0.1}}
    for index in range(10):
        config = search.suggest(f"t{index}")
        if not isinstance(config, dict):
            break
        bits = str(Pipeline.from_recipe(config["recipe"]).steps[0].bits)
        search.on_trial_complete(f"t{index}", results[bits])
    trials = search._ot_study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert {REPEAT_OF in t.user_attrs for t in trials} == {True, False} and any(t.user_attrs.get(UNCOMPRESSED) for t in trials)
    for trial in trials:
        accuracy, size = trial.values[0], trial.values[1]
        # what NSGA-II and TPE rank by
        assert trial.constraints == pytest.approx({"min_accuracy": 0.9 - accuracy, "max_size_bytes": size / 2000.0 - 1.0})
    feasible = [t for t in trials if all(v <= 0 for v in t.constraints.values())]
    assert {t.values[0] for t in feasible} == {0.95}  # 8 bits is too inaccurate, the baseline too large
    assert {t.number for t in search._ot_study.best_trials} <= {t.number for t in feasible}


def test_a_trial_stopped_early_is_told_complete_infeasible_and_marked():
    floor = Constraints(min_accuracy=0.9)
    search = searcher({"quantization": {"bits": [8, 4]}}, constraints=floor)
    config = search.suggest("t0")
    search.on_trial_complete("t0", {"accuracy": 0.3, "size_bytes": 100.0, "latency_ms": 0.1, "stopped_early": 1.0, "stopped_at_fraction": 0.25})
    (trial,) = search._ot_study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs[STOPPED_ATTR] == 0.25 and trial.constraints == pytest.approx({"min_accuracy": 0.6})
    assert config["recipe"] in search._finished  # a repeat of it is answered from it, not trained again


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "random"])
def test_every_sampler_survives_the_pickling_ray_tune_does_and_samples_on(sampler):
    """Tune pickles the searcher with its sampler when a search starts; Optuna 5.1's NSGA-II holds a thread lock."""
    import pickle

    from ray import cloudpickle

    from netshrink.validation import load_experiment
    from netshrink.search.tuning import make_sampler
    from pathlib import Path

    experiment = load_experiment(Path(__file__).resolve().parents[2] / "spaces" / "digits.yaml")
    experiment = experiment.model_copy(update={"search": experiment.search.model_copy(update={"sampler": sampler})})
    for dumps in (pickle.dumps, cloudpickle.dumps):
        search = searcher({"quantization": {"bits": [16, 8, 4, 2, 1]}, "pruning": {"ratio": {"low": 0.2, "high": 0.9}}}, sampler=make_sampler(experiment))
        restored = pickle.loads(dumps(search))
        for index in range(10):  # past NSGA-II's first generation (8), so that its breeding runs too
            config = restored.suggest(f"t{index}")
            assert isinstance(config, dict)
            restored.on_trial_complete(f"t{index}", {"accuracy": 0.9, "size_bytes": 1000.0 + index, "latency_ms": 0.1})
