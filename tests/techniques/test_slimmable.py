"""Slimmable networks: widths that share one set of weights (``techniques/slimmable.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netshrink.techniques.base import CompressionContext, summed_over_exits, cross_entropy
from netshrink.techniques.inputs import WidthLogits
from netshrink.techniques.pipeline import output_layers
from netshrink.techniques.slimmable import Slimmable, SlimmableConfig, SlimmableNet, sliced
from netshrink.tasks.models import lenet5
from tests.families import mobilenet_v2, resnet18
from tests.models import Concat, CustomLayer, ResidualBN

from benchmarks.quality_models import ResidualCNN  # a concatenation feeding a residual stage: one group, two blocks

SLIM = Slimmable()


def apply(model: nn.Module, inputs: torch.Tensor, config: SlimmableConfig = SlimmableConfig()) -> tuple[SlimmableNet, SlimmableConfig]:
    ctx = CompressionContext(example_inputs=inputs, encodings={}, protected_modules=output_layers(model, inputs), calibration_inputs=inputs)
    config = SLIM.resolve(model, config, ctx)
    return SLIM.apply(model, config, ctx), config


MODELS = {
    "lenet5": (lambda: lenet5(image_size=16), (8, 1, 16, 16)),
    "residual_bn": (ResidualBN, (8, 1, 8, 8)),
    "concat": (Concat, (8, 1, 8, 8)),
    "concat_into_residual": (ResidualCNN, (8, 1, 8, 8)),
    "resnet18": (lambda: resnet18(width=16), (4, 3, 32, 32)),
    "mobilenet_v2": (lambda: mobilenet_v2(width_mult=0.5), (4, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_each_width_sliced_computes_what_it_computes_masked_and_keeps_the_widest_as_it_was(name):
    torch.manual_seed(0)
    build, shape = MODELS[name]
    model = build().eval()
    inputs = torch.randn(*shape)
    with torch.no_grad():
        reference = model(inputs)
    net, config = apply(model, inputs)  # apply checks masked against sliced at every width (check_widths)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(inputs), reference, atol=1e-4)  # reordered channels: the same function at full width
    sizes = []
    for index, width in enumerate(net.widths):
        sub = sliced(net, index, inputs)
        sizes.append(sum(p.numel() for p in sub.parameters()))
        with torch.no_grad(), net.at_width(index):
            assert torch.allclose(sub(inputs), net(inputs), atol=1e-4)
    assert sizes == sorted(sizes) and sizes[0] < 0.5 * sizes[-1]  # narrower widths are smaller networks
    assert all(counts[-1] == max(counts) for counts in config.channels.values())


def test_training_returns_every_drawn_width_and_the_sandwich_loss_trains_the_narrow_ones_on_the_widest():
    torch.manual_seed(0)
    model = ResidualBN()
    inputs = torch.randn(8, 1, 8, 8)
    net, _ = apply(model, inputs, SlimmableConfig(narrowest=0.25, count=4, sandwich=1))
    net.train()
    outputs = net(inputs)
    assert isinstance(outputs, WidthLogits) and len(outputs) == 3  # the widest, the narrowest and one drawn between
    labels = torch.randint(0, 10, (8,))
    loss = summed_over_exits(cross_entropy)(outputs, labels, inputs)
    assert loss > cross_entropy(outputs[0], labels, inputs)
    loss.backward()
    assert net.model.stem[0].weight.grad is not None


def test_running_statistics_move_only_with_the_widest_network():
    import copy

    torch.manual_seed(0)
    net, _ = apply(ResidualBN(), torch.randn(8, 1, 8, 8), SlimmableConfig(sandwich=2))
    widest = copy.deepcopy(net.model).train()
    batch = torch.randn(8, 1, 8, 8)
    net.train()
    with torch.no_grad():
        assert isinstance(net(batch), WidthLogits)  # the widest and three narrower widths ran on the batch
        widest(batch)  # the widest alone
    for (name, norm), twin in zip(((n, m) for n, m in net.model.named_modules() if isinstance(m, nn.BatchNorm2d)), (m for m in widest.modules() if isinstance(m, nn.BatchNorm2d))):
        assert torch.allclose(norm.running_mean, twin.running_mean) and torch.allclose(norm.running_var, twin.running_var), name
        assert norm.momentum == twin.momentum


def test_a_parameter_outside_known_layers_moves_and_slices_with_its_channels():
    torch.manual_seed(0)
    model = CustomLayer().eval()
    with torch.no_grad():
        model.scale.gain.copy_(torch.rand_like(model.scale.gain) + 0.5)
    inputs = torch.randn(4, 1, 8, 8)
    net, _ = apply(model, inputs)  # reordering checked against the model's outputs, each width's slice against its mask
    assert sliced(net, 0, inputs).scale.gain.shape[1] < 8


def test_group_norm_on_a_sliced_width_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(ValueError, match=r"slimmable: '1' \(GroupNorm\)"):
        apply(model, torch.randn(4, 1, 8, 8))


def test_widths_are_evenly_spaced_from_the_narrowest_to_one():
    assert SlimmableConfig().widths() == (0.25, 0.5, 0.75, 1.0)
    assert SlimmableConfig(narrowest=0.5, count=2).widths() == (0.5, 1.0)


def test_every_width_exports_to_its_own_graph_over_one_weight_file_and_onnx_runtime_computes_what_torch_computes(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from netshrink.deploy.onnx_export import export_onnx
    from netshrink.deploy.slimmable_export import all_width_files, width_path

    torch.manual_seed(0)
    model = lenet5(image_size=16).eval()
    inputs = torch.randn(8, 1, 16, 16)
    net, _ = apply(model, inputs)
    net.eval()
    written = export_onnx(net, inputs[:1], tmp_path / "model.onnx", {})
    files = all_width_files(tmp_path / "model.onnx", net.widths)
    assert written == sum(f.stat().st_size for f in files)
    full_bytes = sum(p.numel() * 4 for p in net.model.parameters())
    assert full_bytes <= files[-1].stat().st_size < 1.1 * full_bytes  # the weights once
    assert all(f.stat().st_size < 0.05 * full_bytes for f in files[:-1])  # graphs: structure, indices, statistics
    for index, width in enumerate(net.widths):
        session = ort.InferenceSession(str(width_path(tmp_path / "model.onnx", width)), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = sliced(net, index, inputs)(inputs).numpy()
        computed = session.run(None, {"input": inputs.numpy()})[0]
        np.testing.assert_allclose(computed, expected, rtol=1e-4, atol=1e-5)


def test_the_recipe_replays_every_width_and_the_artifact_reloads_each_one(tmp_path):
    from netshrink.techniques import Pipeline, compress, load_artifact, save_artifact
    from netshrink.techniques.slimmable import attached, find_slimmable

    torch.manual_seed(0)
    model = ResidualBN().eval()
    inputs = torch.randn(16, 1, 8, 8)
    pipeline = Pipeline(steps=[SlimmableConfig(narrowest=0.25, count=3)])
    first = compress(model, pipeline, inputs[:1], calibration_inputs=inputs, seed=2)
    replayed = compress(model, Pipeline.from_recipe(first.pipeline.recipe()), inputs[:1], calibration_inputs=inputs, seed=2)
    assert first.pipeline.steps[0].channels and replayed.pipeline == first.pipeline  # the channels each width keeps, recorded
    save_artifact(tmp_path / "m.safetensors", first.model, first.encodings, first.pipeline.recipe())
    loaded = attached(find_slimmable(load_artifact(tmp_path / "m.safetensors", ResidualBN()).model), inputs[:1])
    nets = [attached(find_slimmable(first.model), inputs[:1]), attached(find_slimmable(replayed.model), inputs[:1]), loaded]
    for index in range(3):
        with torch.no_grad():
            outputs = [sliced(net, index, inputs[:1])(inputs) for net in nets]
        assert torch.equal(outputs[0], outputs[1]) and torch.allclose(outputs[0], outputs[2], atol=1e-6)


def test_one_slimmable_artifact_is_smaller_than_a_separate_model_per_width(tmp_path):
    """The bytes counted: the slimmable artifact (every width) against the separately pruned artifacts, one per narrower
    width (channel pruning keeping the same share), plus the widest model itself."""
    from netshrink.techniques import Pipeline, PruningConfig, compress, save_artifact

    torch.manual_seed(0)
    model = lenet5(image_size=16).eval()
    inputs = torch.randn(16, 1, 16, 16)
    config = SlimmableConfig(narrowest=0.25, count=4)
    slim = compress(model, Pipeline(steps=[config]), inputs[:1], calibration_inputs=inputs)
    slim_bytes = save_artifact(tmp_path / "slim.safetensors", slim.model, slim.encodings, slim.pipeline.recipe())
    separate = [save_artifact(tmp_path / "base.safetensors", model, {}, Pipeline().recipe())]
    for width in config.widths()[:-1]:
        pruned = compress(model, Pipeline(steps=[PruningConfig(granularity="channel", ratio=1 - width)]), inputs[:1])
        separate.append(save_artifact(tmp_path / f"w{width}.safetensors", pruned.model, pruned.encodings, pruned.pipeline.recipe()))
    print(f"slimmable {slim_bytes:,} B against separate models {separate} = {sum(separate):,} B")
    assert slim_bytes < sum(separate) and slim_bytes < 1.02 * separate[0]  # the widest once, plus a few statistics


@pytest.mark.parametrize("then", [{"kind": "quantization", "bits": 4}, {"kind": "quantization", "bits": 8, "activations": "int8"}, {"kind": "clustering", "clusters": 16}])
def test_quantization_and_clustering_after_it_act_on_the_shared_weights_and_every_width_exports_faithfully(then, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from netshrink.deploy.onnx_export import export_artifact
    from netshrink.deploy.slimmable_export import width_path
    from netshrink.techniques import Pipeline, compress, load_artifact, save_artifact
    from netshrink.techniques.slimmable import attached, find_slimmable

    torch.manual_seed(0)
    model = lenet5(image_size=16).eval()
    inputs = torch.randn(16, 1, 16, 16)
    pipeline = Pipeline.model_validate({"steps": [{"kind": "slimmable", "narrowest": 0.5, "count": 2}, then]})
    compressed = compress(model, pipeline, inputs[:1], calibration_inputs=inputs)
    if then.get("activations") == "int8":  # static int8 is per graph: left float, with a note
        assert compressed.pipeline.steps[1].activations == "float" and any("slimmable" in note for note in compressed.notes)
    size = save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    assert size < 0.5 * sum(p.numel() * 4 for p in model.parameters())  # the shared weights are stored compressed
    loaded = load_artifact(tmp_path / "m.safetensors", lenet5(image_size=16))
    export_artifact(loaded, inputs[:1], tmp_path / "model.onnx", inputs)
    net = attached(find_slimmable(loaded.model), inputs[:1])
    for index, width in enumerate(net.widths):
        session = ort.InferenceSession(str(width_path(tmp_path / "model.onnx", width)), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = sliced(net, index, inputs[:1])(inputs).numpy()
        np.testing.assert_allclose(session.run(None, {"input": inputs.numpy()})[0], expected, rtol=1e-3, atol=1e-4)
