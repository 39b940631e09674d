import pytest
import torch
from torch import nn

from netshrink.tasks.models import LeNet5
from netshrink.techniques import LowRankConfig, Pipeline, compress, load_artifact, save_artifact
from netshrink.techniques.lowrank import factor_pair, layers_to_factor, rank_for, svd_init
from tests.models import EDGE_MODELS, Concat


def count(model):
    return sum(p.numel() for p in model.parameters())


def factor(model, config, example_inputs):
    return compress(model, Pipeline(steps=[config]), example_inputs).model


def test_a_factored_linear_has_k_times_m_plus_n_weights():
    model = LeNet5()
    factored = factor(model, LowRankConfig(rank_fraction=0.25), torch.zeros(1, 1, 28, 28))
    first, second = factored.fc1  # 800 -> 500, K = ceil(0.25 * 500) = 125
    assert (first.in_features, first.out_features, second.out_features) == (800, 125, 500)
    assert first.bias is None
    assert count(factored.fc1) == 125 * (800 + 500) + 500 < count(model.fc1) == 800 * 500 + 500
    assert isinstance(factored.fc2, nn.Linear)  # the output layer stays whole: at rank 3 it could not tell 10 classes apart
    assert count(factored) == 193_580


def test_1x1_convolutions_are_factored_only_when_asked():
    x = torch.zeros(1, 1, 12, 12)
    assert isinstance(factor(Concat(), LowRankConfig(), x).mix, nn.Conv2d)
    mix = factor(Concat(), LowRankConfig(convs="1x1"), x).mix  # 16 -> 12, K = 3
    assert [type(layer) for layer in mix] == [nn.Conv2d, nn.Conv2d]
    assert count(mix) == 3 * (16 + 12) + 12


@pytest.mark.parametrize(
    ("layer", "input_shape"),
    [
        (nn.Linear(30, 20), (5, 30)),
        (nn.Linear(20, 30, bias=False), (5, 20)),
        (nn.Conv2d(12, 7, 1, stride=2, padding=1), (5, 12, 9, 9)),
    ],
    ids=["linear", "linear-no-bias", "1x1-conv-strided-padded"],
)
def test_full_rank_svd_factors_reproduce_the_layer(layer, input_shape):
    full_rank = min(layer.weight.shape[:2])
    assert rank_for(layer, 0.99) == full_rank
    pair = factor_pair(layer, full_rank)
    svd_init(pair, layer)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pair(x), layer(x), rtol=1e-4, atol=1e-5)


def test_an_exactly_low_rank_layer_is_reproduced_by_compress():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(48, 3) @ torch.randn(3, 64))  # rank 3
    factored = factor(model, LowRankConfig(rank_fraction=0.1), torch.zeros(1, 64))  # K = ceil(4.8) = 5
    assert factored[0][0].out_features == 5
    x = torch.randn(8, 64)
    torch.testing.assert_close(factored[0](x), model[0](x), rtol=1e-4, atol=1e-4)


def test_layers_that_would_not_shrink_are_left_alone():
    factored = factor(LeNet5(), LowRankConfig(rank_fraction=0.9), torch.zeros(1, 1, 28, 28))
    assert isinstance(factored.fc1, nn.Linear)  # K = 450: 450 * 1300 > 800 * 500
    hidden = factor(nn.Sequential(nn.Linear(500, 10), nn.ReLU(), nn.Linear(10, 3)), LowRankConfig(rank_fraction=0.9), torch.zeros(1, 500))
    assert isinstance(hidden[0], nn.Sequential)  # K = 9: 9 * 510 < 500 * 10
    small = factor(nn.Sequential(nn.Linear(4, 3)), LowRankConfig(rank_fraction=0.5), torch.zeros(1, 4))
    assert isinstance(small[0], nn.Linear)  # K = 2: 2 * 7 > 12


def test_the_output_layer_is_never_factored():
    """At rank 1 of 10 the classifier cannot tell the classes apart: on LeNet-5 that cost 50 points of accuracy."""
    model = LeNet5()
    applied = compress(model, Pipeline(steps=[LowRankConfig(rank_fraction=0.1)]), torch.zeros(1, 1, 28, 28))
    assert isinstance(applied.model.fc2, nn.Linear) and "fc2" not in applied.pipeline.steps[0].ranks


def test_linear_subclasses_read_through_weight_by_their_parent_are_left_alone():
    model = nn.Sequential(nn.MultiheadAttention(64, 2), nn.Linear(64, 64))
    assert list(layers_to_factor(model, LowRankConfig())) == ["1"]  # not the attention's out_proj


@pytest.mark.parametrize("convs", ["none", "1x1", "all"])
@pytest.mark.parametrize("model_name", ["lenet5", *sorted(EDGE_MODELS)])
def test_artifact_round_trip_rebuilds_the_factored_layers(model_name, convs, tmp_path):
    model_type, side = (LeNet5, 28) if model_name == "lenet5" else (EDGE_MODELS[model_name], 12)
    x = torch.randn(4, 1, side, side)
    pipeline = Pipeline(steps=[LowRankConfig(rank_fraction=0.3, convs=convs)])
    compressed = compress(model_type().eval(), pipeline, x[:1])
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    restored = load_artifact(tmp_path / "m.safetensors", model_type()).model
    torch.testing.assert_close(restored(x), compressed.model(x), rtol=0, atol=0)


def test_rank_fraction_must_be_strictly_between_zero_and_one():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="rank_fraction"):
            LowRankConfig(rank_fraction=bad)


def test_the_recipe_records_each_factored_layer_and_rank_and_a_replay_that_cannot_find_one_fails_naming_it():
    model = LeNet5()
    applied = compress(model, Pipeline(steps=[LowRankConfig(rank_fraction=0.1)]), torch.zeros(1, 1, 28, 28)).pipeline
    assert applied.steps[0].ranks == {"fc1": 50}  # ceil(0.1 * min(500, 800)); fc2, the output layer, stays whole
    renamed = nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
    with pytest.raises(ValueError, match="lowrank.ranks: the recipe factors layer 'fc1'"):
        compress(renamed, applied, torch.zeros(1, 1, 28, 28))
