"""Every registered technique passes the same checks (the contract). New techniques are picked up
automatically once they provide ``contract_examples`` configs below or through their default space."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from netshrink.techniques.base import is_applied_field
from netshrink.techniques import REGISTRY, Pipeline, TensorEncoding, compress, load_artifact, save_artifact
from netshrink.techniques.artifact import encode_state
from netshrink.techniques.sensitivity import measure_sensitivity
from tests.models import EDGE_MODELS, STRUCTURED_MODELS, structured_batch


def contract_configs():
    """Every value of every choice knob of each technique's default space, with ranges at their midpoint."""
    cases = []
    for kind, technique in REGISTRY.items():
        space = technique.default_space
        base = {name: (value["low"] + value["high"]) / 2 if isinstance(value, dict) else value for name, value in space.items()}
        variants = [{}]
        for name, value in space.items():
            if isinstance(value, list):
                variants = [{**v, name: option} for v in variants for option in value]
        for variant in variants:
            values = {**{k: v for k, v in base.items() if not isinstance(v, list)}, **variant}
            config = technique.config_type(**values)
            cases.append(pytest.param(config, id=f"{kind}-" + "-".join(f"{k}={v}" for k, v in sorted(values.items()))))
    return cases


def cross_entropy(logits, labels, _inputs):
    return torch.nn.functional.cross_entropy(logits, labels)


def fine_tune(model, loss_fn=None):
    """A few real optimizer steps with the technique's loss, so the contract covers training through
    masks, fake quantization and changed objectives."""
    torch.manual_seed(0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(3):
        x = torch.randn(8, 1, 12, 12)
        loss = (loss_fn or cross_entropy)(model(x), torch.randint(0, 10, (8,)), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


CONFIGS = contract_configs()


def compress_scored(model, pipeline, example, **kwargs):
    """``compress`` with the model's per-layer sensitivity, as a search passes it (for ``allocation: sensitivity``)."""
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(32, *example.shape[1:], generator=generator)
    return compress(model, pipeline, example, sensitivity=measure_sensitivity(model, [(inputs, torch.randint(0, 10, (32,), generator=generator))]), **kwargs)


@pytest.mark.parametrize("model_name", sorted(EDGE_MODELS))
@pytest.mark.parametrize("config", CONFIGS)
def test_forward_runs_and_caller_model_untouched(config, model_name, images):
    model = EDGE_MODELS[model_name]().eval()
    before = copy.deepcopy(model.state_dict())
    compressed = compress_scored(model, Pipeline(steps=[config]), images[:1], fine_tune=fine_tune)
    assert compressed.model(images).shape == (16, 10)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("config", CONFIGS)
def test_accounted_size_equals_written_size(config, tmp_path, images):
    model = EDGE_MODELS["tiny_cnn"]()
    compressed = compress_scored(model, Pipeline(steps=[config]), images[:1], fine_tune=fine_tune)
    accounted = 0
    for name, value in compressed.model.state_dict().items():
        if value.is_floating_point():  # a tensor outside the plan is float32, or float16 where that is exact (a bias)
            accounted += compressed.encodings.get(name, TensorEncoding()).payload_bytes(value)
        else:
            accounted += value.numel() * value.element_size()
    path = tmp_path / "model.safetensors"
    written = save_artifact(path, compressed.model, compressed.encodings, compressed.pipeline.recipe())
    stored = load_file(path)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == accounted
    header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert written == path.stat().st_size == 8 + header_length + accounted


@pytest.mark.parametrize("config", CONFIGS)
def test_artifact_reloads_to_the_same_model(config, tmp_path, images):
    model = EDGE_MODELS["residual_bn"]().eval()
    pipeline = Pipeline(steps=[config])
    compressed = compress_scored(model, pipeline, images[:1], fine_tune=fine_tune)
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())  # as applied, as a trial saves it
    loaded = load_artifact(tmp_path / "m.safetensors", EDGE_MODELS["residual_bn"]())
    restored = loaded.model
    assert loaded.pipeline == compressed.pipeline  # the recipe as applied
    assert loaded.encodings == {k: v for k, v in compressed.encodings.items() if v != TensorEncoding()}  # the storage plan
    torch.testing.assert_close(restored(images), compressed.model(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_deterministic_under_a_seed(config, images):
    model = EDGE_MODELS["concat"]()
    runs = [compress_scored(model, Pipeline(steps=[config]), images[:1], fine_tune=fine_tune, seed=3) for _ in range(2)]
    first, second = (run.model.state_dict() for run in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("config", CONFIGS)
def test_recipe_round_trips_and_replays(config, images):
    pipeline = Pipeline(steps=[config])
    replayed = Pipeline.from_recipe(pipeline.recipe())
    assert replayed == pipeline
    model = EDGE_MODELS["tiny_cnn"]()
    first = compress_scored(model, pipeline, images[:1], fine_tune=fine_tune, seed=1)
    a = first.model.state_dict()
    b = compress_scored(model, replayed, images[:1], fine_tune=fine_tune, seed=1).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the recipe of what was applied, every decision from the model's shapes written out, replays to the same model
    applied = Pipeline.from_recipe(first.pipeline.recipe())
    assert applied == first.pipeline
    assert all(getattr(step, name) is not None for step in applied.active_steps() for name in type(step).model_fields if is_applied_field(type(step), name))
    c = compress_scored(model, applied, images[:1], fine_tune=fine_tune, seed=1).model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_unknown_keys_are_rejected_with_the_key_named(kind):
    config_type = REGISTRY[kind].config_type
    with pytest.raises(ValidationError, match="not_a_knob"):
        config_type(not_a_knob=1)
    with pytest.raises(ValidationError, match="not_a_knob"):
        Pipeline.from_recipe(json.dumps({"steps": [{"kind": kind, "version": config_type.VERSION, "not_a_knob": 1}]}))


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_a_step_written_under_other_rules_or_before_versions_is_refused(kind):
    """A recipe replays into the same model only under the rules it was written under (``TechniqueConfig.VERSION``)."""
    version = REGISTRY[kind].config_type.VERSION
    assert json.loads(Pipeline(steps=[REGISTRY[kind].config_type()]).recipe())["steps"][0]["version"] == version
    with pytest.raises(ValueError, match=f"{kind} version {version + 1}: this step was written under version {version + 1}"):
        Pipeline.from_recipe(json.dumps({"steps": [{"kind": kind, "version": version + 1}]}))
    with pytest.raises(ValueError, match="carry no version: written by netshrink 0.2 or older"):
        Pipeline.from_recipe(json.dumps({"steps": [{"kind": kind}]}))


def test_encode_state_covers_every_entry(images):
    model = EDGE_MODELS["residual_bn"]()
    tensors, entries = encode_state(model, {})
    assert set(entries) == set(model.state_dict())


@pytest.mark.parametrize("model_name", ["residual_bn", "vit"])
@pytest.mark.parametrize("config", CONFIGS)
def test_the_exported_onnx_model_computes_what_torch_computes(config, model_name, images):
    """Every technique and every choice of its default space, on a CNN and a transformer: ONNX Runtime runs the
    exported model (weights as the artifact stores them) to torch's outputs within netshrink.deploy's tolerance."""
    from netshrink.deploy.onnx_export import exports_faithfully

    model = EDGE_MODELS[model_name]().eval()
    compressed = compress_scored(model, Pipeline(steps=[config]), images[:1], fine_tune=fine_tune)
    exports_faithfully(compressed.model, compressed.encodings, images[:1])


def fine_tune_structured(name):
    """``fine_tune`` for a model of several inputs: a few optimizer steps on batches of its structure."""

    def tune(model, loss_fn=None):
        from netshrink.techniques.inputs import forward_logits

        torch.manual_seed(0)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for step in range(3):
            inputs = structured_batch(name, 8, seed=step)
            loss = (loss_fn or cross_entropy)(forward_logits(model, inputs), torch.randint(0, 10, (8,)), inputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return tune


@pytest.mark.parametrize("model_name", sorted(STRUCTURED_MODELS))
@pytest.mark.parametrize("config", CONFIGS)
def test_models_of_several_inputs_take_every_technique_or_refuse_it_by_name(config, model_name, tmp_path):
    """A dict-input model (token ids and a mask, a dict out) and a two-input model, through every technique and every
    choice of its default space: the forward still runs, the caller's model is untouched, the artifact reloads to the
    same model and the ONNX export computes what torch computes. A technique that cannot act on such a model
    (early exits cut a model of one input) says so by name."""
    from netshrink.deploy.onnx_export import exports_faithfully
    from netshrink.techniques.inputs import forward_logits

    model = STRUCTURED_MODELS[model_name]().eval()
    before = copy.deepcopy(model.state_dict())
    example, batch = structured_batch(model_name, 1), structured_batch(model_name, 4, seed=9)
    if REGISTRY[config.kind].inapplicable(model) is not None:  # validation refuses it in the space, naming the reason
        assert config.kind == "separable" and model_name == "dict_tokens"  # no k x k convolution to substitute
        return
    if config.kind == "early_exit":
        with pytest.raises(ValueError, match="exactly one input"):
            compress(model, Pipeline(steps=[config]), example, fine_tune=fine_tune_structured(model_name))
        return
    scores = measure_sensitivity(model, [(batch, torch.randint(0, 10, (4,)))])
    compressed = compress(model, Pipeline(steps=[config]), example, fine_tune=fine_tune_structured(model_name), sensitivity=scores)
    assert forward_logits(compressed.model, batch).shape == (4, 10)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    restored = load_artifact(tmp_path / "m.safetensors", STRUCTURED_MODELS[model_name]()).model
    torch.testing.assert_close(forward_logits(restored, batch), forward_logits(compressed.model, batch), rtol=1e-4, atol=1e-5)
    exports_faithfully(compressed.model, compressed.encodings, example)
