"""What ships is model.onnx: it stores the weights as the artifact does, and its size says so.

Convolutions folded with their BatchNorm keep the storage the artifact gives them in the ONNX file.

The TorchScript exporter folds BatchNorm into each convolution by writing a new float32 weight under a made-up
name, so a quantized ResNet-18 reported 8.6x smaller shipped a float-sized 44.67 MB ``model.onnx``. netshrink folds
the BatchNorm itself: into the ``DequantizeLinear`` scales of an integer weight, into a float32 weight directly."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto

from netshrink.deploy.onnx_export import export_onnx, exports_faithfully
from netshrink.deploy.sizes import size_note
from netshrink.techniques import ClusteringConfig, Pipeline, PruningConfig, QuantizationConfig, compress, save_artifact
from tests.families import mobilenet_v2, resnet18

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def trained_norms(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorms with statistics of their own (an untrained one folds to the identity and proves nothing)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("factory", [lambda: resnet18(width=16), lambda: mobilenet_v2(width_mult=0.5)], ids=["resnet18", "mobilenet_v2"])
def test_int8_convolutions_stay_int8_in_the_onnx_file_with_their_batchnorm_folded(factory, tmp_path):
    compressed = compress(trained_norms(factory()), Pipeline(steps=[QuantizationConfig(bits=8)]), X)
    artifact = save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    export_onnx(compressed.model, X, tmp_path / "m.onnx", compressed.encodings)
    graph = onnx.load(tmp_path / "m.onnx").graph
    producers = {output: node for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(producers[conv.input[1]].op_type == "DequantizeLinear" for conv in convs)
    assert not [node for node in graph.node if node.op_type == "BatchNormalization"]
    assert (tmp_path / "m.onnx").stat().st_size < 1.1 * artifact
    exports_faithfully(compressed.model, compressed.encodings, X)


def test_float_convolutions_have_their_batchnorm_folded_and_compute_what_torch_computes(tmp_path):
    compressed = compress(trained_norms(resnet18(width=8)), Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5)]), X)
    export_onnx(compressed.model, X, tmp_path / "m.onnx", compressed.encodings)
    assert not [node for node in onnx.load(tmp_path / "m.onnx").graph.node if node.op_type == "BatchNormalization"]
    exports_faithfully(compressed.model, compressed.encodings, X)


@pytest.mark.parametrize(
    "step, stored_as",
    [(QuantizationConfig(bits=4), TensorProto.INT4), (QuantizationConfig(bits=2), TensorProto.INT4), (ClusteringConfig(clusters=16), TensorProto.UINT4)],
    ids=["4-bit", "2-bit", "16-clusters"],
)
def test_codes_of_4_bits_or_fewer_ship_packed_as_onnx_int4(step, stored_as, tmp_path):
    """4-bit codes as ONNX INT4 (opset 21), 16 clusters as UINT4 indices: model.onnx within 10% of the artifact; 2-bit
    codes take 4 bits in ONNX (its narrowest integer), twice the artifact's, which the card then says."""
    compressed = compress(trained_norms(resnet18(width=16)), Pipeline(steps=[step]), X)
    artifact = save_artifact(tmp_path / "m.safetensors", compressed.model, compressed.encodings, compressed.pipeline.recipe())
    onnx_bytes = export_onnx(compressed.model, X, tmp_path / "m.onnx", compressed.encodings)
    graph_model = onnx.load(tmp_path / "m.onnx")
    assert graph_model.opset_import[0].version == 21
    assert sum(init.data_type == stored_as for init in graph_model.graph.initializer) >= 20  # every convolution
    note = size_note(compressed.encodings, artifact, onnx_bytes)
    if step.kind == "quantization" and step.bits == 2:
        assert 1.8 * artifact < onnx_bytes < 2.1 * artifact and note and "4 bits each in model.onnx" in note
    else:
        assert onnx_bytes < 1.1 * artifact and note is None
    exports_faithfully(compressed.model, compressed.encodings, X)
