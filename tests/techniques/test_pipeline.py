import pytest
import torch
from pydantic import ValidationError

from netshrink.techniques import Pipeline, PruningConfig, QuantizationConfig, read_artifact, save_artifact


def test_order_is_enforced_with_the_rule_named():
    with pytest.raises(ValidationError, match="architecture -> distillation -> pruning -> quantization"):
        Pipeline(steps=[QuantizationConfig(bits=8), PruningConfig()])


def test_each_technique_at_most_once():
    with pytest.raises(ValidationError, match="appears 2 times"):
        Pipeline(steps=[PruningConfig(), PruningConfig(ratio=0.3)])


def test_unknown_kind_is_rejected():
    with pytest.raises(ValidationError, match="distilation|does not match any of the expected tags"):
        Pipeline.from_recipe('{"steps": [{"kind": "distilation"}]}')


def test_describe_is_one_line():
    pipeline = Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.4567), QuantizationConfig(bits=32)])
    assert pipeline.describe() == "pruning(granularity=channel, ratio=0.457)"
    assert Pipeline().describe() == "uncompressed"


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a netshrink artifact"):
        read_artifact(tmp_path / "other.safetensors")


def test_artifact_header_carries_shapes_and_recipe(tmp_path):
    model = torch.nn.Linear(4, 2)
    recipe = Pipeline(steps=[QuantizationConfig(bits=16)]).recipe()
    save_artifact(tmp_path / "a.safetensors", model, {}, recipe)
    state, header = read_artifact(tmp_path / "a.safetensors")
    assert header["entries"]["weight"]["shape"] == [2, 4]
    assert Pipeline.model_validate(header["recipe"]) == Pipeline.from_recipe(recipe)
    assert torch.equal(state["weight"], model.weight.detach())
