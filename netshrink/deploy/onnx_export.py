"""Export to ONNX: one self-contained file that runs with ONNX Runtime and numpy alone.

Reduced-precision weights keep their width in the file (int8 codes feeding
``DequantizeLinear``, float16 feeding ``Cast``). A model with early exits becomes
one graph with nested ``If`` nodes: the runtime computes an exit's confidence and
skips the rest of the network when it is high enough, exactly as the torch model
does; the graph's second output ``exit`` says which exit answered.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from netshrink.techniques import BlockExitNet, EarlyExitNet, TensorEncoding
from netshrink.techniques.activations import set_enabled as set_activation_quant
from netshrink.techniques.artifact import LoadedArtifact
from netshrink.techniques.slimmable import SlimmableNet
from netshrink.techniques.encoding import INTEGER_BITS, channel_scales, quantize_codes
from netshrink.techniques.inputs import Inputs, batch_size, describe, forward_logits, input_names, map_tensors, numpy_feed, take, tensors, to_device

DynamicAxes = dict[str, list[int]]  # input name -> axes beyond the batch whose length varies (``Task.dynamic_axes``)


OPSET = 17
EXIT_OUTPUT = "exit"  # index of the exit that answered (early-exit models only); the last index is the full network


SESSION_CONFIG = "netshrink.session_config"  # metadata of an exported file: the ONNX Runtime session config its deployment uses


def deployment_config(path: str | os.PathLike) -> dict[str, str]:
    """The ONNX Runtime session config entries the file at ``path`` records for its deployment (none: the defaults)."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == SESSION_CONFIG:
            return json.loads(prop.value)
    return {}


def record_deployment(graph_model: onnx.ModelProto) -> dict[str, str]:
    """Record, in the model's metadata, the session options it is deployed (and measured) with, and return them.

    A model whose only quantization is of its weights (int8 codes feeding ``DequantizeLinear``, no
    ``QuantizeLinear`` on activations) is deployed with ``session.disable_quant_qdq=1``: ONNX Runtime then
    dequantizes the weights once, at load time, instead of on every call (on LeNet-5 the per-call path ran
    1.6x slower than float32). A model with quantized activations (QDQ) keeps the defaults, under which
    ONNX Runtime fuses the QDQ pairs into integer kernels.
    """
    nodes = _all_nodes(graph_model.graph)
    initializers = {init.name for init in graph_model.graph.initializer} | {i.name for n in nodes for a in n.attribute if a.g for i in a.g.initializer}
    weight_only = any(n.op_type == "DequantizeLinear" and n.input[0] in initializers for n in nodes) and not any(
        n.op_type == "QuantizeLinear" for n in nodes
    )
    config = {"session.disable_quant_qdq": "1"} if weight_only else {}
    del graph_model.metadata_props[:]
    if config:
        graph_model.metadata_props.append(onnx.StringStringEntryProto(key=SESSION_CONFIG, value=json.dumps(config)))
    return config


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of ``graph`` and of the subgraphs of its ``If`` nodes (an early-exit model's branches)."""
    found = []
    for node in graph.node:
        found.append(node)
        for attribute in node.attribute:
            if attribute.g is not None and attribute.g.node:
                found += _all_nodes(attribute.g)
    return found


def export_onnx(
    model: nn.Module, example_inputs: Inputs, path: str | os.PathLike, encodings: dict[str, TensorEncoding], dynamic_axes: DynamicAxes | None = None
) -> int:
    """Export ``model`` to a self-contained ONNX file with a dynamic batch axis; returns its size in bytes.

    Inputs are named after the model's (``inputs.input_names``: a dict's keys, ``input_0``, ... for a
    tuple, ``input`` for one tensor), in their dtypes (token ids stay integer); ``dynamic_axes`` names
    the axes beyond the batch that vary in length (``Task.dynamic_axes``). The output is ``logits``.
    Weights the plan stores at 8, 4, 2 or 1 bits become int8 code initializers
    feeding ``DequantizeLinear`` (per output channel; sub-byte codes are not packed
    here, the artifact is what stores them packed); 16-bit weights become float16
    initializers feeding ``Cast``. Sparse weights stay dense: ONNX Runtime's
    CPU kernels are dense, which is why unstructured pruning saves bytes but not time.
    """
    model = model.eval().cpu()
    example_inputs = to_device(example_inputs, "cpu")
    if isinstance(model, SlimmableNet):
        from .slimmable_export import export_widths

        return export_widths(model, example_inputs, Path(path), encodings, dynamic_axes)
    if isinstance(model, EarlyExitNet):
        graph_model = early_exit_graph(model, example_inputs, encodings)
    elif isinstance(model, BlockExitNet):
        graph_model = block_exit_graph(model, example_inputs, encodings, dynamic_axes)
    else:
        graph_model = export_module(model, example_inputs, ["logits"], encodings, dynamic_axes=dynamic_axes)
    graph_model = pack_int4(graph_model)
    record_deployment(graph_model)
    onnx.save(graph_model, os.fspath(path))
    return os.path.getsize(path)


INT4_OPSET = 21  # ONNX's INT4 type, and DequantizeLinear reading it, came with opset 21


def pack_int4(graph_model: onnx.ModelProto) -> onnx.ModelProto:
    """Codes of weights stored at 4 bits or fewer (``*_int4`` initializers, int8 until now) as ONNX ``INT4``, and the
    indices of clustered weights with 16 values or fewer (``*_uint4``) as ``UINT4``, two to a byte, as the artifact
    packs them: the graph is converted to opset 21 (``onnx.version_converter``) first. ONNX Runtime 1.32 runs
    ``DequantizeLinear`` and ``Cast`` on them; a graph the converter cannot take keeps one byte per code."""
    names = {init.name for init in _all_initializers(graph_model.graph) if init.name.endswith(("_int4", "_uint4"))}
    if not names:
        return graph_model
    import ml_dtypes
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(graph_model, INT4_OPSET)
    except Exception:  # an operator the converter does not know: the codes stay one byte each
        return graph_model
    for graph in _all_graphs(converted.graph):
        for init in list(graph.initializer):
            if init.name in names:
                kind = ml_dtypes.uint4 if init.name.endswith("_uint4") else ml_dtypes.int4
                packed = numpy_helper.from_array(numpy_helper.to_array(init).astype(kind), init.name)
                graph.initializer.remove(init)
                graph.initializer.append(packed)
    onnx.checker.check_model(converted)
    return converted


def _all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every branch graph inside it (an early-exit model's ``If`` nodes)."""
    found = [graph]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.node:
                found += _all_graphs(attribute.g)
    return found


def _all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    return [init for inner in _all_graphs(graph) for init in inner.initializer]


class _LogitsOf(nn.Module):
    """A model of any input and output structure as the exporter takes it: positional tensors in, logits out (or what
    ``read`` takes from the model and its inputs: every exit's logits, for block exits)."""

    def __init__(self, model: nn.Module, structure: Inputs, read=forward_logits) -> None:
        super().__init__()
        self.model = model
        self.read = read
        self.keys = list(structure) if isinstance(structure, dict) else None
        self.single = isinstance(structure, torch.Tensor)

    def forward(self, *tensors: torch.Tensor):
        if self.keys is not None:
            return self.read(self.model, dict(zip(self.keys, tensors)))
        return self.read(self.model, tensors[0] if self.single else tuple(tensors))


def export_artifact(
    loaded: LoadedArtifact, example_inputs: Inputs, path: str | os.PathLike, calibration: Inputs | None = None, dynamic_axes: DynamicAxes | None = None
) -> int:
    """The one path from a compressed artifact to ONNX, which a trial and ``netshrink export`` both take: the model
    rebuilt from the artifact, exported with the artifact's own storage plan, or as static int8 (QDQ) when its
    recipe quantizes activations, calibrated on ``calibration`` (the task's calibration samples, as the trial
    fine-tuned with). Returns the file's size in bytes."""
    if int8_activations(loaded.pipeline):
        if calibration is None:
            raise ValueError("a static int8 model (quantization.activations int8) exports with its calibration samples; none were given")
        return export_static_int8(loaded.model, example_inputs, path, calibration, dynamic_axes)
    return export_onnx(loaded.model, example_inputs, path, loaded.encodings, dynamic_axes)


def int8_activations(pipeline) -> bool:
    return any(step.kind == "quantization" and step.activations == "int8" for step in pipeline.active_steps())


# What static int8 quantizes in the ONNX graph: the convolutions and matrix products, whose inputs the torch side
# fake-quantizes while fine-tuning, and the activations and pools between them (ONNX Runtime fuses those into its
# integer kernels). Not Add, Mul or Softmax, which ONNX Runtime quantizes by default and nothing on the torch side
# simulates: on a trained Hugging Face BERT (benchmarks/deploy.py --tasks bert) its ONNX file then scored 32.6% where
# the torch model scored 99.8%; quantizing MatMul and Gemm alone kept the float file's 99.4%.
STATIC_INT8_OPS = ["Conv", "MatMul", "Gemm", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool"]


def export_static_int8(
    model: nn.Module, example_inputs: Inputs, path: str | os.PathLike, calibration: Inputs, dynamic_axes: DynamicAxes | None = None
) -> int:
    """Static int8 through ONNX Runtime's own quantization tooling: the float graph (activation fake quantization
    off), ``quant_pre_process``, then ``quantize_static`` in QDQ format with per-channel int8 weights and uint8
    activations, min-max calibrated on ``calibration``. The weights are already on their per-channel int8 grid
    (max|w| / 127), which ONNX Runtime's symmetric per-channel quantization reproduces code for code."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = [numpy_feed(take(calibration, index, index + 1)) for index in range(batch_size(calibration))]

    class Samples(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    set_activation_quant(model, False)
    try:
        with tempfile.TemporaryDirectory() as folder, _output_to_nowhere():
            float_path, prepared = Path(folder) / "float.onnx", Path(folder) / "prepared.onnx"
            export_onnx(model, example_inputs, float_path, {}, dynamic_axes)
            quant_pre_process(os.fspath(float_path), os.fspath(prepared))
            quantize_static(
                os.fspath(prepared), os.fspath(path), Samples(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=STATIC_INT8_OPS,
            )
    finally:
        set_activation_quant(model, True)
    graph_model = onnx.load(os.fspath(path))
    record_deployment(graph_model)
    onnx.save(graph_model, os.fspath(path))
    return os.path.getsize(path)


@contextmanager
def attention_fast_path_off() -> Iterator[None]:
    """PyTorch's own attention layers (``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention``) take a fused
    fast path in eval mode (``aten::_transformer_encoder_layer_fwd``) that has no ONNX symbolic; the plain
    path computes the same function out of exportable operators."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def export_module(
    module: nn.Module, example_inputs: Inputs, output_names: list[str], encodings: dict[str, TensorEncoding], find_transposed: bool = True,
    dynamic_axes: DynamicAxes | None = None, wrapped: bool = False, fold_constants: bool = True,
) -> onnx.ModelProto:
    """``find_transposed``: also store the weights the exporter transposed into renamed initializers at their width.
    Off for the stages of an early-exit model: inside an ``If`` branch, ONNX Runtime's default QDQ rewrite of
    such a weight (``TransposeDQWeightsForMatMulNBits``) looks for it in the main graph and fails to load.
    ``wrapped``: ``module`` already takes positional tensors and returns the outputs to export (``encodings`` under its names).
    ``fold_constants`` off keeps computations on weights as nodes (a slimmable width indexing the widest weights)."""
    names = input_names(example_inputs)
    with torch.no_grad(), attention_fast_path_off():
        plain = wrapped or isinstance(example_inputs, torch.Tensor) and isinstance(module(example_inputs), (torch.Tensor, tuple))
    if not plain:  # several inputs, or a dict or ModelOutput out: exported through a wrapper, its weights under "model."
        module = _LogitsOf(module, example_inputs)
        encodings = {f"model.{name}": encoding for name, encoding in encodings.items()}
    axes = {name: {0: "batch"} for name in [*names, *output_names]}
    for name, varying in (dynamic_axes or {}).items():
        axes.setdefault(name, {0: "batch"}).update({axis: "sequence" if axis == 1 else f"{name}_axis{axis}" for axis in varying})
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), attention_fast_path_off():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(tensors(example_inputs)),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=output_names,
            dynamic_axes=axes,
            do_constant_folding=fold_constants,
            # BatchNorm stays a node: the exporter's own folding writes each convolution's weight anew, as float32 under a
            # made-up name, and a quantized ResNet-18 shipped 44.67 MB of float convolutions (``fold_batchnorm`` folds it after)
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    graph_model = onnx.load_from_string(buffer.getvalue())
    reduced = {name: enc for name, enc in encodings.items() if enc.bits in (16, *INTEGER_BITS) or enc.clusters is not None}
    if reduced:
        store_reduced_precision(graph_model, reduced, transposed_weights(module, graph_model, reduced) if find_transposed else {})
    fold_batchnorm(graph_model)
    return graph_model


def fold_batchnorm(graph_model: onnx.ModelProto) -> None:
    """Fold each ``BatchNormalization`` that follows a ``Conv`` (its only reader) into the convolution, as the exporter
    would, but keeping the weight's storage: a float32 weight is scaled per output channel; an integer one keeps its
    codes and the fold goes into its ``DequantizeLinear`` scales (per output channel, so the codes need not change);
    a float16 weight is left with its BatchNorm (scaling it would leave the float16 grid)."""
    graph = graph_model.graph
    initializers = {initializer.name: initializer for initializer in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {output.name for output in graph.output}
    folded = []
    for norm in graph.node:
        if norm.op_type != "BatchNormalization" or len(norm.output) != 1:
            continue
        conv = producers.get(norm.input[0])
        if conv is None or conv.op_type != "Conv" or readers.get(conv.output[0]) != 1 or conv.output[0] in outputs:
            continue
        constants = [_constant(name, initializers, producers) for name in norm.input[1:5]]
        if any(constant is None for constant in constants):
            continue
        target = _fold_target(conv.input[1], initializers, producers, readers)
        if target is None:
            continue
        gamma, beta, mean, var = (constant.astype(np.float64) for constant in constants)
        epsilon = next((attribute.f for attribute in norm.attribute if attribute.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + epsilon)
        tensor, axis_shape = target
        _replace(graph, initializers, tensor, (numpy_helper.to_array(initializers[tensor]).astype(np.float64) * factor.reshape(axis_shape)).astype(np.float32))
        bias = numpy_helper.to_array(initializers[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros_like(mean)
        bias_name = f"{conv.name or conv.output[0]}_folded_bias"
        graph.initializer.append(numpy_helper.from_array(((bias - mean) * factor + beta).astype(np.float32), bias_name))
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = norm.output[0]
        folded.append(norm)
    for norm in folded:
        graph.node.remove(norm)
    outputs = {output.name for output in graph.output}
    while True:  # the Identity nodes that fed the folded BatchNorms their shared constants, now read by nothing
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if node.op_type == "Identity" and not any(output in used for output in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for initializer in list(graph.initializer):
        if initializer.name not in used:
            graph.initializer.remove(initializer)


def _constant(name: str, initializers: dict, producers: dict) -> np.ndarray | None:
    """The value of ``name`` if it is an initializer, or an ``Identity`` of one (the exporter shares equal tensors, such
    as the ones and zeros of untrained BatchNorms, that way)."""
    while name not in initializers:
        node = producers.get(name)
        if node is None or node.op_type != "Identity":
            return None
        name = node.input[0]
    return numpy_helper.to_array(initializers[name])


def _fold_target(weight: str, initializers: dict, producers: dict, readers: dict) -> tuple[str, tuple[int, ...]] | None:
    """The initializer a per-output-channel factor multiplies, and the shape that broadcasts the factor over it: the
    float32 weight itself, or the per-channel scale of the ``DequantizeLinear`` producing it; None when neither is
    this convolution's alone."""
    if weight in initializers and initializers[weight].data_type == TensorProto.FLOAT and readers.get(weight) == 1:
        dims = len(initializers[weight].dims)
        return weight, (-1,) + (1,) * (dims - 1)
    dequantize = producers.get(weight)
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or readers.get(weight) != 1:
        return None
    axis = next((attribute.i for attribute in dequantize.attribute if attribute.name == "axis"), 1)
    scale = dequantize.input[1]
    if axis != 0 or scale not in initializers or readers.get(scale) != 1 or len(initializers[scale].dims) != 1:
        return None
    return scale, (-1,)


def _replace(graph: onnx.GraphProto, initializers: dict, name: str, value: np.ndarray) -> None:
    graph.initializer.remove(initializers[name])
    initializers[name] = numpy_helper.from_array(value, name)
    graph.initializer.append(initializers[name])


def transposed_weights(module: nn.Module, graph_model: onnx.ModelProto, names: Iterable[str]) -> dict[str, str]:
    """Initializers that hold a 2-D weight transposed, under a name the exporter made up -> the weight's name.

    A Linear applied to a 3-D tensor (a transformer's tokens) exports as ``MatMul`` with the weight
    transposed at export time into an initializer such as ``onnx::MatMul_123``; matched here by value."""
    present = {initializer.name for initializer in graph_model.graph.initializer}
    wanted: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for name in names:
        if name in present:
            continue
        try:
            weight = module.get_parameter(name).detach().cpu().numpy()
        except AttributeError:
            continue
        if weight.ndim == 2:
            wanted.setdefault(weight.T.shape, []).append((name, weight.T))
    found = {}
    for initializer in graph_model.graph.initializer:
        for name, value in wanted.get(tuple(initializer.dims), []):
            if np.array_equal(numpy_helper.to_array(initializer), value):
                found[initializer.name] = name
    return found


def store_reduced_precision(graph_model: onnx.ModelProto, encodings: dict[str, TensorEncoding], transposed: dict[str, str] | None = None) -> None:
    """Weights the plan stores at reduced precision become codes feeding ``DequantizeLinear`` (per output channel:
    axis 0, or 1 for a weight the exporter transposed, named in ``transposed``), float16 feeding ``Cast``, or, clustered,
    one-byte indices into the layer's table of shared values (``Cast`` and ``Gather``)."""
    graph = graph_model.graph
    transposed = transposed or {}
    nodes = []
    for initializer in list(graph.initializer):
        name = initializer.name
        encoding = encodings.get(transposed.get(name, name))
        if encoding is None:
            continue
        stored = torch.from_numpy(numpy_helper.to_array(initializer).copy())
        flipped = name in transposed
        weight = stored.T if flipped else stored  # (output channels, ...) as the layer holds it
        graph.initializer.remove(initializer)
        if encoding.clusters is not None and encoding.bits == 32:
            # shared values: one-byte indices into the layer's table, looked up when the session is made (ONNX
            # Runtime folds Cast and Gather of initializers), a quarter of the float32 bytes
            table, index = torch.unique(stored, return_inverse=True)
            if len(table) > 256:  # the centroids and the zeros of pruning: one value too many for a byte
                graph.initializer.append(initializer)
                continue
            index_name = f"{name}_index_uint4" if len(table) <= 16 else f"{name}_index"  # 16 values or fewer: UINT4 (``pack_int4``)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(index.numpy().astype(np.uint8), index_name),
                    numpy_helper.from_array(table.numpy().astype(np.float32), f"{name}_table"),
                ]
            )
            nodes += [
                helper.make_node("Cast", [index_name], [f"{name}_index_int32"], to=TensorProto.INT32, name=f"{name}_index_cast"),
                helper.make_node("Gather", [f"{name}_table", f"{name}_index_int32"], [name], axis=0, name=f"{name}_lookup"),
            ]
        elif encoding.bits in INTEGER_BITS:
            scale = channel_scales(weight, encoding.bits, encoding.sparse)
            codes = quantize_codes(weight, scale, encoding.bits, encoding.sparse).numpy()
            kind = "int4" if encoding.bits <= 4 else "int8"  # 4 bits or fewer: packed as ONNX INT4 once the graph is done (``pack_int4``)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.ascontiguousarray(codes.T if flipped else codes), f"{name}_{kind}"),
                    numpy_helper.from_array(scale.numpy().astype(np.float32), f"{name}_scale"),
                ]
            )
            nodes.append(  # symmetric codes: no zero point (it defaults to 0)
                helper.make_node("DequantizeLinear", [f"{name}_{kind}", f"{name}_scale"], [name], axis=1 if flipped else 0, name=f"{name}_dequantize")
            )
        else:
            graph.initializer.append(numpy_helper.from_array(stored.numpy().astype(np.float16), f"{name}_fp16"))
            nodes.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=onnx.TensorProto.FLOAT, name=f"{name}_cast"))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(graph_model)


# ONNX Runtime and torch agree to float32 rounding on the same graph; a traced branch or a shape frozen
# at export time differs by far more than this.
CHECK_RTOL, CHECK_ATOL = 1e-3, 1e-4


def exports_faithfully(model: nn.Module, encodings: dict[str, TensorEncoding], example_inputs: Inputs) -> None:
    """Export ``model`` as a trial does (with its storage plan) and check that ONNX Runtime, in the session options the
    file records for its deployment, computes what torch computes, within ``CHECK_RTOL``/``CHECK_ATOL``, on the real sample
    ``example_inputs`` at batch 1 (where an early-exit model's exit logic is the same in both); ``ValueError`` if not."""
    from .measure import ort_session  # measure imports this module

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "check.onnx"
        export_onnx(model, example_inputs, path, encodings)
        # as deployed: under the defaults, ONNX Runtime fuses a weight-only int8 MatMul with dynamic activation
        # quantization (approximate)
        session = ort_session(path)
        computed = session.run(None, numpy_feed(example_inputs))[0]
    with torch.no_grad(), attention_fast_path_off():
        expected = forward_logits(model.eval(), example_inputs).numpy()
    if computed.shape != expected.shape or not np.allclose(computed, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL):
        difference = float(np.abs(computed - expected).max()) if computed.shape == expected.shape else float("inf")
        raise ValueError(f"its ONNX export computes other outputs than torch (largest difference {difference:.3g}; allowed: rtol {CHECK_RTOL}, atol {CHECK_ATOL})")


def check_exportable(model: nn.Module, example_inputs: Inputs, check_inputs: Inputs, dynamic_axes: DynamicAxes | None = None) -> None:
    """Export ``model`` once, run it in ONNX Runtime and compare with torch; ``ValueError`` saying what broke and what to do.

    Every trial measures and ships its model through ONNX, so a model that cannot be
    exported, or whose export computes something else, must fail here, in seconds,
    not after its baseline has trained. The comparison runs ``check_inputs``, a batch of
    two real samples other than the traced one: the export traces a batch of one, so a branch
    taken on the example's values or a batch size frozen into a reshape shows as a difference.
    """
    import onnxruntime as ort

    model = model.eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "check.onnx"
        try:
            with _output_to_nowhere():  # the exporter prints the whole graph on failure
                export_onnx(model, example_inputs, path, {}, dynamic_axes)
        except Exception as error:
            raise ValueError(describe_export_failure(error)) from None
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises its own exception types
            raise ValueError(f"the model exports to ONNX, but ONNX Runtime cannot load it: {_first_line(error)}") from None
        # real samples, and the same with every floating-point input drawn at random, and negated: a branch on the values shows
        for inputs in (check_inputs, _random_floats(check_inputs), _random_floats(check_inputs, sign=-1.0)):
            with torch.no_grad(), attention_fast_path_off():
                expected = forward_logits(model, inputs)
            expected = (expected[0] if isinstance(expected, (tuple, list)) else expected).numpy()
            try:
                computed = session.run(None, numpy_feed(inputs))[0]
            except Exception as error:
                raise ValueError(
                    f"the model exports to ONNX, but ONNX Runtime cannot run it on a batch of 2 ({describe(inputs)}): {_first_line(error)}. "
                    "A reshape or view to a fixed batch size (or sequence length) is the usual cause: use x.flatten(1) or x.reshape(x.shape[0], ...)"
                ) from None
            if computed.shape != expected.shape or not np.allclose(computed, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL):
                break
    if computed.shape != expected.shape or not np.allclose(computed, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL):
        difference = float(np.abs(computed - expected).max()) if computed.shape == expected.shape else float("inf")
        raise ValueError(
            f"the model exported to ONNX computes other outputs than in torch (shape {computed.shape} vs {expected.shape}, "
            f"largest difference {difference:.3g}; allowed: rtol {CHECK_RTOL}, atol {CHECK_ATOL}) on validation samples. "
            "The exporter traces one example: Python control flow on tensor values (an 'if' on x.sum(), a loop over x.shape "
            "read as a number) is frozen to the example's branch. Write such steps with tensor operations (torch.where) instead"
        )


def _random_floats(inputs: Inputs, sign: float = 1.0) -> Inputs:
    """``inputs`` with every floating-point tensor replaced by ``sign`` x standard normal draws (seeded); integer inputs
    (token ids, masks) kept as they are."""
    generator = torch.Generator().manual_seed(0)
    return map_tensors(inputs, lambda t: (sign * torch.randn(t.shape, generator=generator)).to(t.dtype) if t.is_floating_point() else t)


def describe_export_failure(error: Exception) -> str:
    operator = re.search(r"operator '([^']+)'", str(error))
    if operator:
        return (
            f"the model cannot be exported to ONNX (opset {OPSET}): operator {operator.group(1)!r} has no ONNX equivalent. "
            "netshrink measures and ships every model through ONNX Runtime: write that step of the model with operators ONNX "
            "supports, or register an ONNX symbolic for it (torch.onnx.register_custom_op_symbolic)"
        )
    return f"the model cannot be exported to ONNX (opset {OPSET}): {type(error).__name__}: {_first_line(error)}"


def _first_line(error: Exception, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def _output_to_nowhere() -> Iterator[None]:
    """Silence file descriptors 1 and 2 for the block: the exporter's C++ side writes to them directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


class _Stage(nn.Module):
    """One segment and the exit head after it (no head for the last segment)."""

    def __init__(self, segment: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.segment = segment
        self.head = head

    def forward(self, inputs: torch.Tensor):
        features = self.segment(inputs)
        return features if self.head is None else (features, self.head(features))


def _stage_encodings(encodings: dict[str, TensorEncoding], index: int) -> dict[str, TensorEncoding]:
    """The plan under a stage's own parameter names (``segments.1.conv2.weight`` -> ``segment.conv2.weight``)."""
    renamed = {}
    for name, encoding in encodings.items():
        for prefix, local in ((f"segments.{index}.", "segment."), (f"heads.{index}.", "head.")):
            if name.startswith(prefix):
                renamed[local + name.removeprefix(prefix)] = encoding
    return renamed


def early_exit_graph(model: EarlyExitNet, example_inputs: torch.Tensor, encodings: dict[str, TensorEncoding]) -> onnx.ModelProto:
    """Stages exported one by one, then nested: ``If(confident_i, exit i, rest of the network)``.

    A batch leaves at an exit when every sample in it is confident (the top softmax
    probability reaches the threshold): at batch 1, the per-sample rule of the torch model.
    """
    stages = []
    features = example_inputs
    last = len(model.heads)
    with torch.no_grad():
        for index, segment in enumerate(model.segments):
            head = model.heads[index] if index < last else None
            outputs = ["features", "logits"] if head is not None else ["logits"]
            # eval: a wrapper starts in training mode, and the exporter traced dropout inside the segment as active
            exported = export_module(_Stage(segment, head).eval(), features, outputs, _stage_encodings(encodings, index), find_transposed=False)
            stages.append(onnx.compose.add_prefix(exported, f"s{index}/"))
            if head is not None:
                features = segment(features)

    threshold = numpy_helper.from_array(np.array(model.threshold, dtype=np.float32), "exit_threshold")
    initializers = [threshold] + [init for stage in stages for init in stage.graph.initializer]

    def level(index: int, source: str) -> tuple[list[onnx.NodeProto], str, str]:
        """Nodes computing the answer from stage ``index`` on, given its input ``source``; returns (nodes, logits, exit)."""
        prefix = f"s{index}/"
        nodes = [helper.make_node("Identity", [source], [f"{prefix}input"], name=f"{prefix}feed")]
        nodes += list(stages[index].graph.node)
        logits, exit_index = f"{prefix}answer_logits", f"{prefix}answer_exit"
        if index == last:
            nodes += [
                helper.make_node("Identity", [f"{prefix}logits"], [logits], name=f"{prefix}final"),
                helper.make_node("Constant", [], [exit_index], value=numpy_helper.from_array(np.array(index, dtype=np.int64)), name=f"{prefix}exit"),
            ]
            return nodes, logits, exit_index
        nodes += [
            helper.make_node("Softmax", [f"{prefix}logits"], [f"{prefix}probabilities"], axis=1, name=f"{prefix}softmax"),
            helper.make_node("ReduceMax", [f"{prefix}probabilities"], [f"{prefix}confidence"], axes=[1], keepdims=0, name=f"{prefix}confidence"),
            helper.make_node("ReduceMin", [f"{prefix}confidence"], [f"{prefix}least_confidence"], keepdims=0, name=f"{prefix}least"),
            helper.make_node("GreaterOrEqual", [f"{prefix}least_confidence", "exit_threshold"], [f"{prefix}leave"], name=f"{prefix}leave"),
        ]
        leave = helper.make_graph(
            [
                helper.make_node("Identity", [f"{prefix}logits"], [f"{prefix}leave_logits"], name=f"{prefix}leave_logits"),
                helper.make_node(
                    "Constant", [], [f"{prefix}leave_exit"], value=numpy_helper.from_array(np.array(index, dtype=np.int64)), name=f"{prefix}leave_exit"
                ),
            ],
            f"{prefix}leave",
            [],
            [_tensor(f"{prefix}leave_logits", TensorProto.FLOAT), _tensor(f"{prefix}leave_exit", TensorProto.INT64)],
        )
        rest_nodes, rest_logits, rest_exit = level(index + 1, f"{prefix}features")
        rest = helper.make_graph(
            rest_nodes, f"{prefix}continue", [], [_tensor(rest_logits, TensorProto.FLOAT), _tensor(rest_exit, TensorProto.INT64)]
        )
        nodes.append(helper.make_node("If", [f"{prefix}leave"], [logits, exit_index], then_branch=leave, else_branch=rest, name=f"{prefix}if"))
        return nodes, logits, exit_index

    nodes, logits, exit_index = level(0, "input")
    nodes += [
        helper.make_node("Identity", [logits], ["logits"], name="logits"),
        helper.make_node("Identity", [exit_index], [EXIT_OUTPUT], name=EXIT_OUTPUT),
    ]
    input_value = stages[0].graph.input[0]
    classes = stages[-1].graph.output[0].type.tensor_type.shape.dim[1].dim_value
    graph = helper.make_graph(
        nodes,
        "netshrink_early_exits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [d.dim_param or d.dim_value for d in input_value.type.tensor_type.shape.dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]), helper.make_tensor_value_info(EXIT_OUTPUT, TensorProto.INT64, [])],
        initializer=initializers,
    )
    combined = helper.make_model(graph, opset_imports=list(stages[0].opset_import), producer_name="netshrink")
    combined.ir_version = stages[0].ir_version
    onnx.checker.check_model(combined)
    return combined


def block_exit_graph(
    model: BlockExitNet, example_inputs: Inputs, encodings: dict[str, TensorEncoding], dynamic_axes: DynamicAxes | None = None
) -> onnx.ModelProto:
    """The whole model exported once with every exit's logits as outputs, then cut after each exit: the nodes that
    exit ``i`` needs (and no earlier exit did) run at level ``i``, the rest inside ``If(confident_i, exit i, ...)``.

    A batch leaves at an exit when every sample in it is confident: at batch 1, the per-sample rule of the torch
    model. The nodes inside a branch read what the levels before computed (ONNX's outer scope)."""
    exits = len(model.heads)
    names = [f"exit_{index}" for index in range(exits)] + ["final_logits"]
    exported = export_module(
        _LogitsOf(model, example_inputs, read=lambda exits, inputs: tuple(exits.all_outputs(inputs))).eval(), example_inputs, names, {f"model.{name}": enc for name, enc in encodings.items()},
        dynamic_axes=dynamic_axes, wrapped=True,
    )
    graph = exported.graph
    nodes = list(graph.node)
    producer = {output: index for index, node in enumerate(nodes) for output in node.output}
    # tensors a node reads, its branches' reads included (an If or a Loop the exporter wrote)
    reads = [set(node.input) | {name for attribute in node.attribute if attribute.g.node for inner in attribute.g.node for name in inner.input} for node in nodes]
    # weights decoded from initializers (DequantizeLinear, Cast, Gather of a table) stay in the main graph: ONNX Runtime
    # looks for a quantized MatMul weight there (``TransposeDQWeightsForMatMulNBits``) and fails to load it in a branch
    initializers = {init.name for init in graph.initializer}
    constant: set[int] = set()
    for index, node in enumerate(nodes):
        if node.input and all(name in initializers or (name in producer and producer[name] in constant) for name in node.input if name):
            constant.add(index)
    placed: set[int] = set()
    levels: list[list[int]] = []
    for name in names:
        needed, stack = set(), [producer[name]] if name in producer else []
        while stack:
            index = stack.pop()
            if index in needed or index in placed:
                continue
            needed.add(index)
            stack += [producer[read] for read in reads[index] if read in producer]
        if not levels:
            needed |= constant
        levels.append(sorted(needed))
        placed |= needed
    threshold = numpy_helper.from_array(np.array(model.threshold, dtype=np.float32), "exit_threshold")

    def level(index: int) -> tuple[list[onnx.NodeProto], str, str]:
        """Nodes computing the answer from level ``index`` on; returns (nodes, logits, exit)."""
        prefix = f"l{index}/"
        own = [nodes[position] for position in levels[index]]
        logits, exit_index = f"{prefix}answer_logits", f"{prefix}answer_exit"
        if index == exits:
            return own + [
                helper.make_node("Identity", ["final_logits"], [logits], name=f"{prefix}final"),
                helper.make_node("Constant", [], [exit_index], value=numpy_helper.from_array(np.array(index, dtype=np.int64)), name=f"{prefix}exit"),
            ], logits, exit_index
        source = names[index]
        own += [
            helper.make_node("Softmax", [source], [f"{prefix}probabilities"], axis=1, name=f"{prefix}softmax"),
            helper.make_node("ReduceMax", [f"{prefix}probabilities"], [f"{prefix}confidence"], axes=[1], keepdims=0, name=f"{prefix}confidence"),
            helper.make_node("ReduceMin", [f"{prefix}confidence"], [f"{prefix}least_confidence"], keepdims=0, name=f"{prefix}least"),
            helper.make_node("GreaterOrEqual", [f"{prefix}least_confidence", "exit_threshold"], [f"{prefix}leave"], name=f"{prefix}leave"),
        ]
        leave = helper.make_graph(
            [
                helper.make_node("Identity", [source], [f"{prefix}leave_logits"], name=f"{prefix}leave_logits"),
                helper.make_node(
                    "Constant", [], [f"{prefix}leave_exit"], value=numpy_helper.from_array(np.array(index, dtype=np.int64)), name=f"{prefix}leave_exit"
                ),
            ],
            f"{prefix}leave",
            [],
            [_tensor(f"{prefix}leave_logits", TensorProto.FLOAT), _tensor(f"{prefix}leave_exit", TensorProto.INT64)],
        )
        rest_nodes, rest_logits, rest_exit = level(index + 1)
        rest = helper.make_graph(rest_nodes, f"{prefix}continue", [], [_tensor(rest_logits, TensorProto.FLOAT), _tensor(rest_exit, TensorProto.INT64)])
        own.append(helper.make_node("If", [f"{prefix}leave"], [logits, exit_index], then_branch=leave, else_branch=rest, name=f"{prefix}if"))
        return own, logits, exit_index

    body, logits, exit_index = level(0)
    body += [
        helper.make_node("Identity", [logits], ["logits"], name="logits"),
        helper.make_node("Identity", [exit_index], [EXIT_OUTPUT], name=EXIT_OUTPUT),
    ]
    final = next(output for output in graph.output if output.name == "final_logits")
    logits_info = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [d.dim_param or d.dim_value for d in final.type.tensor_type.shape.dim])
    combined_graph = helper.make_graph(
        body, "netshrink_block_exits", list(graph.input), [logits_info, helper.make_tensor_value_info(EXIT_OUTPUT, TensorProto.INT64, [])],
        initializer=[threshold, *graph.initializer],
    )
    combined = helper.make_model(combined_graph, opset_imports=list(exported.opset_import), producer_name="netshrink")
    combined.ir_version = exported.ir_version
    onnx.checker.check_model(combined)
    return combined


def _tensor(name: str, element_type: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, element_type, None)
