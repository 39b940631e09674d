import pytest
import torch
from torch import nn
from pydantic import ValidationError

from netshrink.techniques import Pipeline, PruningConfig, QuantizationConfig, read_artifact, save_artifact


def test_order_is_enforced_with_the_rule_named():
    with pytest.raises(ValidationError, match="architecture -> early exits or widths -> distillation -> pruning -> quantization"):
        Pipeline(steps=[QuantizationConfig(bits=8), PruningConfig()])


def test_each_technique_at_most_once():
    with pytest.raises(ValidationError, match="appears 2 times"):
        Pipeline(steps=[PruningConfig(), PruningConfig(ratio=0.3)])


def test_unknown_kind_is_rejected():
    with pytest.raises(ValidationError, match="distilation|does not match any of the expected tags"):
        Pipeline.from_recipe('{"steps": [{"kind": "distilation"}]}')


def test_describe_is_one_line():
    pipeline = Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.4567), QuantizationConfig(bits=32)])
    assert pipeline.describe() == "pruning(granularity=channel, ratio=0.457, steps=1, importance=l1, scope=layer)"
    assert Pipeline().describe() == "uncompressed"
    weight = Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.5)])
    assert weight.describe() == "pruning(granularity=weight, ratio=0.5, steps=1, scope=layer)"  # importance means nothing here
    published = Pipeline(steps=[PruningConfig(granularity="weight", scope="global", layer_ratios={"conv1": 0.34, "fc1": 0.92})])
    assert published.describe() == "pruning(granularity=weight, ratio=0.5, steps=1, scope=global, floor=0.02, layer_ratios=conv1:0.34/fc1:0.92)"


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
    assert header.entries["weight"].shape == [2, 4]
    assert Pipeline.model_validate(header.recipe) == Pipeline.from_recipe(recipe)
    assert torch.equal(state["weight"], model.weight.detach())


def test_a_channel_pruned_depthwise_conv_reloads_as_depthwise(tmp_path):
    from netshrink.techniques import compress, load_artifact

    def make():
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.Conv2d(8, 8, 1),
            torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 3),
        )

    pipeline = Pipeline(steps=[PruningConfig(ratio=0.5)])
    compressed = compress(make().eval(), pipeline, torch.zeros(1, 1, 12, 12))
    assert compressed.model[1].groups == compressed.model[1].out_channels < 8
    save_artifact(tmp_path / "dw.safetensors", compressed.model, compressed.encodings, pipeline.recipe())
    restored = load_artifact(tmp_path / "dw.safetensors", make()).model
    assert restored[1].groups == restored[1].in_channels == compressed.model[1].groups
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(restored(x), compressed.model(x))


def test_resized_layer_norms_and_embeddings_follow_their_stored_shapes_and_unknown_torch_layers_are_refused():
    from netshrink.techniques.artifact import resize_to_state

    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.GroupNorm(2, 8))
    state = {"0.weight": torch.zeros(12, 6), "1.weight": torch.ones(6), "1.bias": torch.zeros(6), "2.weight": torch.ones(6), "2.bias": torch.zeros(6)}
    resize_to_state(model, state)
    assert (model[0].num_embeddings, model[0].embedding_dim, model[1].normalized_shape, model[2].num_channels) == (12, 6, (6,), 6)
    attention = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="'0': its stored tensors have other shapes than the MultiheadAttention built now"):
        resize_to_state(attention, {"0.in_proj_weight": torch.zeros(12, 4)})
