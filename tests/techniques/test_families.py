"""The contract on the families users ship (``tests/families.py``): a CIFAR-style ResNet-18 and a MobileNetV2 in
torchvision's layout, Hugging Face BERT and ViT fed dict batches. Every technique and every choice of its default
space: the forward runs, the artifact's bytes are the accounted bytes, the recipe as applied replays (through the
artifact) to the same model, and the exported ONNX model computes what torch computes."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import load_file

from netshrink.techniques import REGISTRY, Pipeline, TensorEncoding, compress, load_artifact, save_artifact
from netshrink.techniques.inputs import forward_logits
from netshrink.techniques.sensitivity import measure_sensitivity
from tests.families import FAMILIES, family_inputs
from tests.techniques.test_contract import CONFIGS, cross_entropy

pytest.importorskip("transformers")


def fine_tune_family(name):
    def tune(model, loss_fn=None):
        torch.manual_seed(0)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        model.train()
        for step in range(2):
            inputs = family_inputs(name, 4, seed=step)
            loss = (loss_fn or cross_entropy)(forward_logits(model, inputs), torch.randint(0, 10, (4,)), inputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()

    return tune


def accounted_bytes(model, encodings) -> int:
    total = 0
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            total += encodings.get(name, TensorEncoding()).payload_bytes(value)
        else:
            total += value.numel() * value.element_size()
    return total


def first_of_each_kind(configs):
    """One config per technique (the first choice of each knob), for the default run; ``-m slow`` runs them all."""
    kinds, chosen = set(), []
    for case in configs:
        kind = case.values[0].kind
        chosen.append(case if kind not in kinds else pytest.param(*case.values, id=case.id, marks=pytest.mark.slow))
        kinds.add(kind)
    return chosen


@pytest.mark.parametrize("config", first_of_each_kind(CONFIGS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_technique_on_the_families_users_ship(family, config, tmp_path):
    from netshrink.deploy.onnx_export import exports_faithfully

    model = FAMILIES[family]().eval()
    reason = REGISTRY[config.kind].inapplicable(model)
    if reason is not None:  # validation refuses it in the space, naming the reason
        assert (config.kind, family) in {("separable", "bert"), ("separable", "vit"), ("early_exit", "bert"), ("early_exit", "vit")}, reason
        assert config.kind != "early_exit" or "torch.fx" in reason
        return
    example, batch = family_inputs(family, 1), family_inputs(family, 4, seed=9)
    scores = measure_sensitivity(model, [(batch, torch.randint(0, 10, (4,)))]) if getattr(config, "allocation", None) == "sensitivity" else None
    compressed = compress(model, Pipeline(steps=[config]), example, fine_tune=fine_tune_family(family), sensitivity=scores)
    assert forward_logits(compressed.model, batch).shape == (4, 10)
    path = tmp_path / "m.safetensors"
    written = save_artifact(path, compressed.model, compressed.encodings, compressed.pipeline.recipe())
    accounted = accounted_bytes(compressed.model, compressed.encodings)
    assert sum(t.numel() * t.element_size() for t in load_file(path).values()) == accounted
    assert written == path.stat().st_size == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0] + accounted
    restored = load_artifact(path, FAMILIES[family]()).model
    torch.testing.assert_close(forward_logits(restored, batch), forward_logits(compressed.model, batch), rtol=1e-4, atol=1e-5)
    exports_faithfully(compressed.model, compressed.encodings, example)


@pytest.mark.parametrize("family", ["resnet18", "mobilenet_v2"])
def test_a_separable_stem_then_channel_pruning_keeps_the_images_channels(family, tmp_path):
    """``separable(which=all)`` then channel pruning broke every RGB model mid-search (``weight of size [1, 1, 3, 3],
    expected input[200, 3, 32, 32] to have 1 channels``): the depthwise stem reading the image lost two of its three
    channels. It keeps them; the rest of the network is pruned."""
    from netshrink.deploy.onnx_export import exports_faithfully
    from netshrink.techniques import PruningConfig, SeparableConfig

    model = FAMILIES[family]().eval()
    pipeline = Pipeline(steps=[SeparableConfig(which="all"), PruningConfig(granularity="channel", ratio=0.8, scope="global")])
    compressed = compress(model, pipeline, family_inputs(family, 1))
    stem = compressed.model.conv1 if family == "resnet18" else compressed.model.features[0][0]
    assert stem[0].in_channels == stem[0].out_channels == stem[0].groups == 3
    assert sum(p.numel() for p in compressed.model.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    restored = load_artifact(tmp_path / "m.safetensors", FAMILIES[family]()).model
    batch = family_inputs(family, 4, seed=3)
    torch.testing.assert_close(forward_logits(restored, batch), forward_logits(compressed.model, batch), rtol=1e-4, atol=1e-5)
    exports_faithfully(compressed.model, compressed.encodings, family_inputs(family, 1))
