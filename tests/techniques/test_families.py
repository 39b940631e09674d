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


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_technique_on_the_families_users_ship(family, config, tmp_path):
    from netshrink.deploy.onnx_export import exports_faithfully

    model = FAMILIES[family]().eval()
    reason = REGISTRY[config.kind].inapplicable(model)
    if reason is not None:  # validation refuses it in the space, naming the reason
        assert config.kind == "separable" and family in ("bert", "vit"), reason
        return
    example, batch = family_inputs(family, 1), family_inputs(family, 4, seed=9)
    scores = measure_sensitivity(model, [(batch, torch.randint(0, 10, (4,)))])
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
