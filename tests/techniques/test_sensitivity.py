import pytest
import torch

from netshrink.tasks.models import LeNet5
from netshrink.techniques import ClusteringConfig, Pipeline, QuantizationConfig, compress
from netshrink.techniques.allocation import allocate, width_bits
from netshrink.techniques.sensitivity import measure_sensitivity


def test_the_allocator_lowers_first_the_layer_that_minds_least_per_bit_and_meets_the_average():
    sizes = {"small": 500, "big": 400_000}
    scores = {"small": {8: 0.0, 4: 0.01, 2: 0.5, 1: 2.0}, "big": {8: 0.0, 4: 0.02, 2: 0.1, 1: 1.0}}
    chosen = allocate(scores, sizes, "quantization", average_bits=2.1)
    assert chosen == {"small": 8, "big": 2}  # the big layer's bits are cheap per bit; the small one keeps 8
    average = sum(sizes[n] * width_bits("quantization", chosen[n]) for n in sizes) / sum(sizes.values())
    assert average <= 2.1
    assert allocate(scores, sizes, "quantization", average_bits=8) == {"small": 8, "big": 8}
    assert allocate(scores, sizes, "quantization", average_bits=1) == {"small": 1, "big": 1}  # as low as it goes


def test_lenet5_sensitivity_rises_as_the_width_falls_and_the_allocation_lands_in_the_recipe():
    model = LeNet5().eval()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(128, 1, 28, 28, generator=generator)
    with torch.no_grad():
        labels = model(inputs).argmax(dim=1)  # the model's own answers: any change of weights raises the loss
    scores = measure_sensitivity(model, [(inputs, labels)])
    assert set(scores["quantization"]) == {"conv1", "conv2", "fc1", "fc2"}
    for layer in scores["quantization"].values():
        assert layer[1] > layer[8] and layer[2] > layer[8]
    for kind, config in (("quantization", QuantizationConfig(allocation="sensitivity", average_bits=3.0)), ("clustering", ClusteringConfig(allocation="sensitivity", average_bits=3.0))):
        applied = compress(model, Pipeline(steps=[config]), inputs[:1], sensitivity=scores).pipeline.steps[0]
        chosen = applied.layer_bits if kind == "quantization" else applied.layer_clusters
        assert set(chosen) == {"conv1", "conv2", "fc1", "fc2"}
        sizes = {name: getattr(model, name).weight.numel() for name in chosen}
        assert sum(sizes[n] * width_bits(kind, chosen[n]) for n in sizes) / sum(sizes.values()) <= 3.0


def test_sensitivity_allocation_without_scores_is_refused_naming_the_knob():
    with pytest.raises(ValueError, match="quantization.allocation sensitivity needs the baseline's per-layer sensitivity"):
        compress(LeNet5(), Pipeline(steps=[QuantizationConfig(allocation="sensitivity")]), torch.zeros(1, 1, 28, 28))


def test_layers_an_architecture_technique_made_take_the_scores_of_the_layer_they_replace():
    from netshrink.techniques import SeparableConfig
    from netshrink.techniques.allocation import score_of

    measured = {"conv2": {8: 0.0, 4: 0.1}, "fc1": {8: 0.0, 4: 0.01}}
    assert score_of("conv2.1", measured) == measured["conv2"] and score_of("segments.1.fc1.0", measured) == measured["fc1"]
    assert score_of("heads.0.linear", measured)[4] == float("inf")  # an exit head keeps the widest width
    model = LeNet5().eval()
    inputs = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    scores = measure_sensitivity(model, [(inputs, torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2)))])
    pipeline = Pipeline(steps=[SeparableConfig(which="all"), ClusteringConfig(allocation="sensitivity", average_bits=3.0)])
    applied = compress(model, pipeline, inputs[:1], sensitivity=scores).pipeline.steps[1]
    assert {"conv2.0", "conv2.1", "fc1"} <= set(applied.layer_clusters)
