"""The searcher never hands Tune a pipeline that would waste a trial: repeats and the uncompressed baseline are answered."""

import optuna
import pytest

from netshrink.search.runner import SpaceSampler
from netshrink.search.searcher import UNCOMPRESSED, DistinctPipelineSearch
from netshrink.spaces import SearchSpace
from netshrink.techniques import Pipeline

BASELINE = [0.95, 1_000_000.0, 0.1]


def searcher(space: dict, seed: int = 0) -> DistinctPipelineSearch:
    return DistinctPipelineSearch(
        baseline_values=BASELINE,
        space=SpaceSampler(SearchSpace.model_validate(space)),
        metric=["accuracy", "size_bytes", "latency_ms"],
        mode=["max", "min", "min"],
        sampler=optuna.samplers.RandomSampler(seed=seed),
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
