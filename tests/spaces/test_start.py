"""The informed start: its points, as the user's space can express them, replayed exactly by the space."""

import optuna

from netshrink.validation import load_experiment
from netshrink.spaces import SearchSpace
from netshrink.spaces.start import INFORMED_START, start_params
from netshrink.techniques import REGISTRY

DIGITS = "spaces/digits.yaml"


def replay(space, params: dict):
    """The pipeline the space samples from an Optuna trial whose parameters are fixed to ``params`` (an enqueued trial)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial(params)
    trial = study.ask()
    pipeline = space.sample(trial)
    assert trial.params == params  # every parameter asked was enqueued: nothing left to the sampler
    return pipeline


def test_the_default_space_expresses_every_start_point_and_replays_each_as_written():
    space = load_experiment(DIGITS).space
    params = start_params(space)
    assert len(params) == len(INFORMED_START)
    kinds_alone = set()
    for point, fixed in zip(INFORMED_START, params):
        pipeline = replay(space, fixed)
        steps = {step.kind: step for step in pipeline.active_steps()}
        assert set(steps) == set(point)
        for kind, knobs in point.items():
            for knob, value in knobs.items():
                assert getattr(steps[kind], knob) == value
        if len(point) == 1:
            kinds_alone.add(next(iter(point)))
    compressing = {kind for kind in REGISTRY if REGISTRY[kind].compresses}
    assert kinds_alone == compressing  # each technique that compresses, alone; distillation comes with one that does


def test_points_the_space_cannot_express_are_left_out():
    space = SearchSpace.model_validate({"pruning": {"ratio": {"low": 0.3, "high": 0.8}, "granularity": ["channel"]}, "quantization": {"bits": [16, 8]}})
    params = start_params(space)
    pipelines = [replay(space, fixed) for fixed in params]
    # channel pruning alone at 0.35 fits; weight pruning at 0.85-0.9, 4/2/1 bits, distillation and the rest do not
    assert [[(s.kind, s.granularity, s.ratio) for s in p.active_steps()] for p in pipelines] == [[("pruning", "channel", 0.35)]]


def test_distillation_alone_is_never_sampled():
    space = SearchSpace.model_validate({"distillation": {}, "pruning": {}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize", "minimize"])
    for _ in range(50):
        trial = study.ask()
        kinds = [step.kind for step in space.sample(trial).active_steps()]
        assert "pruning" in kinds
        study.tell(trial, [0.5, 1.0])
    assert "pruning/enabled" not in space.searched_names() and "distillation/enabled" in space.searched_names()


def test_the_start_is_stated_relative_to_the_model_so_a_model_with_other_layers_expresses_all_of_it():
    """No start point names a layer or a layer's size: ratios, bit widths, a share of the rank, 'the last convolution',
    the middle cut point. A space with every technique at its defaults (no LeNet-5 names in it) takes every point."""
    space = SearchSpace.model_validate({kind: {} for kind in REGISTRY})
    params = start_params(space)
    assert len(params) == len(INFORMED_START)
    layer_like = ("conv", "fc", "pool", "layer", "block", "encoder", ".")
    for point in INFORMED_START:
        for knobs in point.values():
            for knob, value in knobs.items():
                assert not knob.startswith("layer_") and not (isinstance(value, str) and any(word in value for word in layer_like)), (knob, value)
