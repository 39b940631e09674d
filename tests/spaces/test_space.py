import pickle

import optuna
import pytest
import torch
from pydantic import ValidationError

from netshrink.techniques.sensitivity import measure_sensitivity
from netshrink.spaces import Choice, Fixed, Range, SearchSpace
from netshrink.tasks.models import LeNet5
from netshrink.techniques import REGISTRY, Pipeline, compress
from tests.models import ResidualBN

optuna.logging.set_verbosity(optuna.logging.WARNING)

FULL = {"pruning": {}, "quantization": {"bits": [32, 16, 8]}}
EVERYTHING = {kind: {} for kind in REGISTRY}  # every technique with its default knobs


@pytest.mark.parametrize("model_type, side", [(LeNet5, 28), (ResidualBN, 12)], ids=["lenet5", "residual_bn"])
def test_two_hundred_random_draws_all_build_a_working_model(model_type, side):
    space = SearchSpace.model_validate(EVERYTHING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize", "minimize"])
    model = model_type().eval()
    x = torch.randn(2, 1, side, side)
    scores = measure_sensitivity(model, [(torch.randn(16, 1, side, side), torch.randint(0, 10, (16,)))])  # as a search passes them
    kinds_seen = set()
    for _ in range(200):
        trial = study.ask()
        pipeline = space.sample(trial)
        assert Pipeline.from_recipe(pipeline.recipe()) == pipeline
        kinds_seen.update(step.kind for step in pipeline.active_steps())
        assert compress(model, pipeline, x[:1], sensitivity=scores).model(x).shape == (2, 10)
        study.tell(trial, [0.5, 1.0])
    assert kinds_seen == set(REGISTRY)


def test_parameter_names_are_technique_slash_field_and_numeric_knobs_are_numeric():
    space = SearchSpace.model_validate(
        {"pruning": {"enabled": True, "granularity": "weight", "ratio": {"low": 0.1, "high": 0.9, "log": True}}}
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    space.sample(trial)
    assert set(trial.params) == {"pruning/ratio", "pruning/steps", "pruning/scope"}  # enabled: true and fixed knobs are not searched
    assert isinstance(trial.distributions["pruning/steps"], optuna.distributions.IntDistribution)
    ratio = trial.distributions["pruning/ratio"]
    assert isinstance(ratio, optuna.distributions.FloatDistribution) and ratio.log


def test_conditional_knobs_are_only_asked_when_the_technique_is_on():
    space = SearchSpace.model_validate(FULL)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(30):
        trial = study.ask()
        pipeline = space.sample(trial)
        on = {step.kind for step in pipeline.steps}
        for kind in ("pruning", "quantization"):
            asked = {name for name in trial.params if name.startswith(f"{kind}/") and name != f"{kind}/enabled"}
            assert bool(asked) == (kind in on)
        study.tell(trial, 0.0)


def test_defaults_fixed_values_and_disabled_techniques():
    space = SearchSpace.model_validate({"pruning": {"granularity": "channel", "steps": 1, "importance": "l2", "scope": "layer"}, "quantization": {"enabled": False}})
    pruning = space.techniques()["pruning"]
    assert pruning.granularity == Fixed("channel")
    assert pruning.ratio == Range(low=0.2, high=0.97)  # the technique's default range
    assert space.searched_names() == ["pruning/ratio"]  # the only searchable technique is always on
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert all([step.kind for step in space.sample(study.ask()).steps] == ["pruning"] for _ in range(20))


def test_a_sampled_pipeline_is_never_empty_but_every_technique_can_be_off():
    space = SearchSpace.model_validate(FULL)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    combinations, uncompressed = set(), 0
    for _ in range(100):
        trial = study.ask()
        pipeline = space.sample(trial)
        assert pipeline.steps, pipeline
        if not pipeline.active_steps():
            # only the last technique, forced on, drawing its no-op: the searcher answers it with the
            # baseline's figures (tests/search/test_searcher.py), no trial trains it
            assert [(step.kind, step.bits) for step in pipeline.steps] == [("quantization", 32)] and trial.params["pruning/enabled"] is False
            uncompressed += 1
        combinations.add(tuple(step.kind for step in pipeline.steps))
        study.tell(trial, 0.0)
    assert combinations == {("pruning",), ("quantization",), ("pruning", "quantization")}
    assert 0 < uncompressed < 30
    forced = SearchSpace.model_validate({"pruning": {"enabled": True}, "quantization": {}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    kinds = set()
    for _ in range(30):
        trial = study.ask()
        kinds.add(tuple(step.kind for step in forced.sample(trial).steps))
        study.tell(trial, 0.0)
    assert kinds == {("pruning",), ("pruning", "quantization")}


@pytest.mark.parametrize(
    "raw, where, rule",
    [
        ({"pruning": {"ratio": {"low": 0.0, "high": 0.5}}}, ("pruning", "ratio"), "greater than 0"),
        ({"pruning": {"ratio": {"low": 0.6, "high": 0.5}}}, ("pruning", "ratio"), "low must be smaller than high"),
        ({"pruning": {"ratio": {"low": 0.1, "high": 0.5, "step": 0.1, "log": True}}}, ("pruning", "ratio"), "both log"),
        ({"pruning": {"ratio": {"low": 0.1}}}, ("pruning", "ratio"), "both 'low' and 'high'"),
        ({"pruning": {"ratio": []}}, ("pruning", "ratio"), "cannot be empty"),
        ({"pruning": {"granularity": ["weight", "filter"]}}, ("pruning", "granularity"), "'weight' or 'channel'"),
        ({"quantization": {"bits": {"low": 8, "high": 16}}}, ("quantization", "bits"), "not numeric"),
        ({"quantization": {"bits": [8, 8]}}, ("quantization", "bits"), "repeat"),
        ({"pruning": {"ratoi": 0.5}}, ("pruning", "ratoi"), "Extra inputs"),
        ({"distill": {}}, ("distill",), "Extra inputs"),
        ({"pruning": {"enabled": "sometimes"}}, ("pruning", "enabled"), "'search'"),
    ],
)
def test_bad_spaces_name_the_knob_and_the_rule(raw, where, rule):
    with pytest.raises(ValidationError) as caught:
        SearchSpace.model_validate(raw)
    errors = caught.value.errors()
    assert any(error["loc"][: len(where)] == where and rule in error["msg"] for error in errors), errors


def test_space_pickles_for_ray():
    space = SearchSpace.model_validate(FULL)
    assert pickle.loads(pickle.dumps(space)) == space


def test_choice_of_one_is_not_asked():
    study = optuna.create_study()
    trial = study.ask()
    assert Choice(options=(8,)).suggest(trial, "quantization/bits") == 8
    assert trial.params == {}


def test_a_conditional_knob_is_asked_only_when_its_condition_holds():
    space = SearchSpace.model_validate({"pruning": {"enabled": True}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        pipeline = space.sample(trial)
        granularity = pipeline.steps[0].granularity
        assert ("pruning/importance" in trial.params) == (granularity == "channel")
        seen.add(granularity)
        study.tell(trial, 0.0)
    assert seen == {"weight", "channel"}


def test_int8_activations_are_asked_only_for_uniform_int8_weights():
    space = SearchSpace.model_validate({"quantization": {"enabled": True, "activations": ["float", "int8"], "bits": [8, 4]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        step = space.sample(trial).steps[0]
        asked = "quantization/activations" in trial.params
        assert asked == (step.allocation == "uniform" and step.bits == 8)
        assert step.activations == "float" or asked
        seen.add(step.activations)
        study.tell(trial, 0.0)
    assert seen == {"float", "int8"}


def test_a_technique_excluded_by_an_enabled_one_is_off_and_not_asked():
    space = SearchSpace.model_validate({"quantization": {"bits": [8, 4]}, "clustering": {}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    combinations = set()
    for _ in range(60):
        trial = study.ask()
        kinds = tuple(step.kind for step in space.sample(trial).active_steps())
        combinations.add(kinds)
        if "quantization" in kinds:
            assert not any(name.startswith("clustering/") for name in trial.params)
        study.tell(trial, 0.0)
    assert combinations == {("quantization",), ("clustering",)}  # never both, never empty


def test_forced_on_technique_switches_off_the_ones_it_excludes():
    space = SearchSpace.model_validate({"pruning": {}, "quantization": {"enabled": True}, "clustering": {}})
    assert not any(name.startswith("clustering/") for name in space.searched_names())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=6))
    assert all("clustering" not in {step.kind for step in space.sample(study.ask()).steps} for _ in range(20))
    with pytest.raises(ValidationError, match="quantization and clustering are both enabled"):
        SearchSpace.model_validate({"quantization": {"enabled": True}, "clustering": {"enabled": True}})
