import pytest
import torch
from safetensors.torch import load_file

from netshrink.tasks.models import LeNet5
from netshrink.techniques import Pipeline, PruningConfig, QuantizationConfig, compress, save_artifact
from netshrink.techniques.quantization import fake_quantize


def test_int8_weights_are_stored_as_int8_with_per_channel_scales(tmp_path):
    model = LeNet5()
    x = torch.zeros(1, 1, 28, 28)
    quantized = compress(model, Pipeline(steps=[QuantizationConfig(bits=8)]), x)
    size = save_artifact(tmp_path / "q.safetensors", quantized.model, quantized.encodings, "{}")
    stored = load_file(tmp_path / "q.safetensors")
    assert stored["fc1.weight.values"].dtype == torch.int8
    assert stored["fc1.weight.scale"].shape == (500,)
    assert stored["fc1.bias.values"].dtype == torch.float32  # biases stay float
    dense = compress(model, Pipeline(), x)
    dense_size = save_artifact(tmp_path / "d.safetensors", dense.model, dense.encodings, "{}")
    assert 3.8 < dense_size / size < 4.0  # int8 weights + float32 biases and scales


def test_int8_keeps_at_most_255_levels_per_channel_and_zero_exact():
    weight = torch.randn(4, 300)
    weight[:, :10] = 0
    quantized = fake_quantize(weight, 8)
    for row in quantized:
        assert row.unique().numel() <= 255
    assert (quantized[:, :10] == 0).all()
    assert (quantized - weight).abs().max() <= weight.abs().max() / 127 / 2 + 1e-6


def test_sixteen_bits_round_to_half_precision():
    weight = torch.randn(10, 10)
    assert torch.equal(fake_quantize(weight, 16), weight.half().float())


def test_straight_through_estimator_passes_gradients():
    model = torch.nn.Linear(20, 3)
    quantized = compress(model, Pipeline(steps=[QuantizationConfig(bits=8)]), torch.zeros(1, 20), fine_tune=lambda m, loss_fn: _step(m)).model
    # _step asserted that gradients reached the shadow weights; the baked weights sit on the int8 grid
    scale = quantized.weight.abs().amax(dim=1, keepdim=True) / 127
    assert torch.allclose(quantized.weight / scale, torch.round(quantized.weight / scale), atol=1e-3)


def _step(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(4, 20)).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads), "STE must let gradients through"
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_pruned_and_quantized_stores_only_nonzero_int8(tmp_path):
    model = LeNet5()
    pipeline = Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.8), QuantizationConfig(bits=8)])
    compressed = compress(model, pipeline, torch.zeros(1, 1, 28, 28))
    save_artifact(tmp_path / "pq.safetensors", compressed.model, compressed.encodings, pipeline.recipe())
    stored = load_file(tmp_path / "pq.safetensors")
    assert stored["fc1.weight.values"].dtype == torch.int8
    assert stored["fc1.weight.values"].numel() == pytest.approx(80_000, abs=10)


def test_32_bits_is_a_no_op():
    assert QuantizationConfig(bits=32).is_noop()
    with pytest.raises(ValueError, match="bits"):
        QuantizationConfig(bits=7)
