import pytest
import torch
from torch import nn

from netshrink.deploy.measure import ort_session
from netshrink.deploy.onnx_export import export_onnx
from netshrink.tasks.models import LeNet5
from netshrink.techniques import (
    LowRankConfig,
    Pipeline,
    PruningConfig,
    QuantizationConfig,
    SeparableConfig,
    compress,
    load_artifact,
    save_artifact,
)
from netshrink.techniques.separable import rank_one_init, separable_pair
from tests.models import EDGE_MODELS, ResidualBN


def count(model):
    return sum(p.numel() for p in model.parameters())


def separate(model, which, example_inputs):
    return compress(model, Pipeline(steps=[SeparableConfig(which=which)]), example_inputs).model


def effective_weight(pair):
    """The O x I x k x k kernel that depthwise-then-pointwise amounts to."""
    depthwise, pointwise = pair
    return pointwise.weight[:, :, 0, 0, None, None] * depthwise.weight[None, :, 0]


def test_a_separated_conv_has_kki_plus_io_weights():
    model = LeNet5()
    separated = separate(model, "all_but_first", torch.zeros(1, 1, 28, 28))
    depthwise, pointwise = separated.conv2  # 20 -> 50 channels, 5 x 5
    assert (depthwise.in_channels, depthwise.out_channels, depthwise.groups, depthwise.bias) == (20, 20, 20, None)
    assert (pointwise.in_channels, pointwise.out_channels, pointwise.kernel_size) == (20, 50, (1, 1))
    assert count(separated.conv2) == 25 * 20 + 20 * 50 + 50 < count(model.conv2) == 25 * 20 * 50 + 50
    assert isinstance(separated.conv1, nn.Conv2d)
    assert count(separated) == 407_580


@pytest.mark.parametrize(
    ("which", "separated"),
    [("all", {"stem.0", "block.0", "block.3"}), ("all_but_first", {"block.0", "block.3"}), ("last", {"block.3"})],
)
def test_which_picks_among_the_convolutions_in_module_order(which, separated):
    model = separate(ResidualBN(), which, torch.zeros(1, 1, 12, 12))
    assert {name for name, module in model.named_modules() if isinstance(module, nn.Conv2d) and module.groups == module.in_channels and module.kernel_size != (1, 1) and module.bias is None} == {
        f"{name}.0" for name in separated
    }


def test_an_exactly_separable_conv_is_reproduced_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(6, 4, 1, 1) * torch.randn(1, 4, 3, 3))
    model = separate(nn.Sequential(conv), "all", torch.zeros(1, 4, 10, 10))
    assert isinstance(model[0], nn.Sequential)
    x = torch.randn(2, 4, 10, 10)
    torch.testing.assert_close(model(x), conv(x), rtol=1e-4, atol=1e-5)


def test_a_random_conv_gets_the_best_separable_approximation():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    pair = separable_pair(conv)
    rank_one_init(pair, conv)
    singular_values = torch.linalg.svdvals(conv.weight.detach().transpose(0, 1).reshape(8, 16, 9))
    best_error = singular_values[:, 1:].square().sum().sqrt()  # Eckart-Young, channel by channel
    torch.testing.assert_close((effective_weight(pair) - conv.weight).norm(), best_error)
    random = separable_pair(conv)
    for layer in random:
        layer.reset_parameters()
    x = torch.randn(4, 8, 10, 10)
    with torch.no_grad():
        assert (pair(x) - conv(x)).norm() < 0.9 * (random(x) - conv(x)).norm()


def test_convs_that_would_not_shrink_or_are_not_k_by_k_ungrouped_are_left_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 1, 3, padding=1),  # one output channel: 9 * 8 + 8 > 9 * 8
    )
    separated = separate(model, "all", torch.zeros(1, 3, 8, 8))
    assert [type(layer) for layer in separated] == [nn.Sequential, nn.Conv2d, nn.Conv2d, nn.Conv2d]


def round_trip(model_type, pipeline, x, path):
    compressed = compress(model_type().eval(), pipeline, x[:1])
    save_artifact(path, compressed.model, compressed.encodings, compressed.pipeline.recipe())
    restored = load_artifact(path, model_type()).model
    return compressed, restored


@pytest.mark.parametrize("pruned", [False, True], ids=["separated", "separated-then-channel-pruned"])
@pytest.mark.parametrize("which", ["all", "all_but_first", "last"])
@pytest.mark.parametrize("model_name", ["lenet5", *sorted(EDGE_MODELS)])
def test_artifact_round_trip_rebuilds_the_separated_convs(model_name, which, pruned, tmp_path):
    model_type, side = (LeNet5, 28) if model_name == "lenet5" else (EDGE_MODELS[model_name], 12)
    x = torch.randn(4, 1, side, side)
    steps = [SeparableConfig(which=which)] + ([PruningConfig(granularity="channel", ratio=0.5)] if pruned else [])
    compressed, restored = round_trip(model_type, Pipeline(steps=steps), x, tmp_path / "m.safetensors")
    torch.testing.assert_close(restored(x), compressed.model(x), rtol=0, atol=0)
    for before, after in zip(compressed.model.modules(), restored.modules()):
        if isinstance(before, nn.Conv2d):
            shape = (before.in_channels, before.out_channels, before.groups)
            assert (after.in_channels, after.out_channels, after.groups) == shape


def test_separable_lowrank_pruning_and_int8_compose_save_reload_and_export(tmp_path):
    pipeline = Pipeline(
        steps=[
            SeparableConfig(which="all_but_first"),
            LowRankConfig(rank_fraction=0.25, convs="1x1"),
            PruningConfig(granularity="channel", ratio=0.5),
            QuantizationConfig(bits=8),
        ]
    )
    x = torch.randn(4, 1, 28, 28)
    compressed, restored = round_trip(LeNet5, pipeline, x, tmp_path / "m.safetensors")
    assert compressed.model(x).shape == (4, 10)
    assert isinstance(compressed.model.conv2[1], nn.Sequential)  # the pointwise conv, factored in turn
    assert count(compressed.model) < count(LeNet5()) / 9  # the output layer is not factored (it was /10 when it was)
    torch.testing.assert_close(restored(x), compressed.model(x), rtol=0, atol=0)
    export_onnx(restored, x[:1], tmp_path / "m.onnx", compressed.encodings)
    logits = ort_session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(logits), compressed.model(x).detach(), rtol=1e-4, atol=1e-5)


def test_the_recipe_records_the_separated_convolutions_and_a_replay_that_cannot_find_one_fails_naming_it():
    model = LeNet5()
    applied = compress(model, Pipeline(steps=[SeparableConfig(which="all_but_first")]), torch.zeros(1, 1, 28, 28)).pipeline
    assert applied.steps[0].layers == ("conv2",)
    with pytest.raises(ValueError, match="separable.layers: the recipe separates 'conv2'"):
        compress(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(2704, 10)), applied, torch.zeros(1, 1, 28, 28))
