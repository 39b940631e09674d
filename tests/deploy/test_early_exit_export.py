"""Models with early exits in the exported runtime: the same exit logic, and latency that depends on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from netshrink.config import MeasureSettings
from netshrink.deploy.measure import measure_relative_latency, onnx_evaluate, ort_session
from netshrink.deploy.onnx_export import export_onnx
from netshrink.tasks.models import lenet5
from netshrink.techniques import EarlyExitConfig, Pipeline, QuantizationConfig, compress

X = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def confidence(logits):
    return F.softmax(logits, dim=1).amax(dim=1)


def early(**knobs):
    return compress(lenet5(), Pipeline(steps=[EarlyExitConfig(**knobs)]), X[:1])


@pytest.mark.parametrize("bits", [32, 8])
def test_onnx_runs_the_same_exit_logic_sample_by_sample(bits, tmp_path):
    compressed = compress(lenet5(), Pipeline(steps=[EarlyExitConfig(after="pool1+pool2"), QuantizationConfig(bits=bits)]), X[:1])
    model = compressed.model
    # half the samples leave at the first exit: the threshold sits between two samples' confidences, not on one,
    # where torch's and ONNX Runtime's last float bit would decide
    ordered = confidence(model.all_outputs(X)[0]).sort().values
    model.threshold = float(ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    export_onnx(model, X[:1], tmp_path / "m.onnx", compressed.encodings)
    session = ort_session(tmp_path / "m.onnx")
    torch_logits, torch_exits = model.exit_forward(X)
    for index in range(len(X)):
        logits, exit_index = session.run(None, {"input": X[index : index + 1].numpy()})
        assert int(exit_index) == int(torch_exits[index])
        np.testing.assert_allclose(logits[0], torch_logits[index].detach().numpy(), rtol=1e-4, atol=1e-4)
    dataset = torch.utils.data.TensorDataset(X, torch_logits.argmax(1))
    evaluation = onnx_evaluate(tmp_path / "m.onnx", dataset)
    assert evaluation.value == 1.0
    assert evaluation.exit_counts == {e: int((torch_exits == e).sum()) for e in torch_exits.unique().tolist()}


def test_leaving_early_is_measured_faster_than_running_to_the_end(tmp_path):
    """Honest numbers: the latency of a model with exits depends on where its samples leave."""
    reference = tmp_path / "reference.onnx"
    export_onnx(lenet5(), X[:1], reference, {})
    ratios = {}
    for threshold in (0.01, 0.99999):  # everyone leaves at pool1 / nobody leaves early
        compressed = early(after="pool1", threshold=threshold)
        path = tmp_path / f"{threshold}.onnx"
        export_onnx(compressed.model, X[:1], path, compressed.encodings)
        ratios[threshold] = measure_relative_latency(path, reference, [{"input": X[i : i + 1].numpy()} for i in range(16)], MeasureSettings(warmup=20)).ratio
    assert ratios[0.01] < 0.6 < 0.9 < ratios[0.99999]


@pytest.mark.parametrize("config", [None, {}], ids=["as deployed", "onnx runtime defaults"])
def test_a_quantized_transformer_with_exits_loads_in_onnx_runtime_under_any_options(config, tmp_path):
    """Inside an exit's ``If`` branch a transposed MatMul weight stays float: ONNX Runtime's default QDQ rewrite of a
    DequantizeLinear feeding it looks for the weight in the main graph and refuses to load the model."""
    from netshrink.tasks.models import vit

    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    compressed = compress(vit(image_size=8), Pipeline(steps=[EarlyExitConfig(after="blocks.1"), QuantizationConfig(bits=8)]), x[:1])
    path = tmp_path / "exits.onnx"
    export_onnx(compressed.model, x[:1], path, compressed.encodings)
    session = ort_session(path, config=config)
    assert session.run(["logits"], {"input": x[:1].numpy()})[0].shape == (1, 10)
