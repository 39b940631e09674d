"""A slimmable network in ONNX: one graph per width, every graph reading the widest weights from one shared file.

``model.onnx`` runs the widest width, ``model.width_0.5.onnx`` the width 0.5, and so on; their weights live once in
``model.weights`` (ONNX external data, the same offsets in every graph). A narrower graph indexes the widest weights
down to its channels (``Gather`` on the initializers), which ONNX Runtime folds into plain weights when the session is
made, so each width runs as fast as a network exported at that width alone (``benchmarks/slimmable.py`` measures it
against one graph with a width input and an ``If`` per width). The device picks the width by the file it opens:

    session = onnxruntime.InferenceSession("model.width_0.5.onnx")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from netshrink.techniques import TensorEncoding
from netshrink.techniques.inputs import Inputs
from netshrink.techniques.slimmable import SlimmableNet, WidthView, attached, width_name

from .onnx_export import DynamicAxes, export_module, pack_int4, record_deployment

WEIGHTS_SUFFIX = ".weights"


def width_path(path: Path, width: float) -> Path:
    """The graph of ``width`` beside ``path`` (the widest's): ``model.onnx`` -> ``model.width_0.5.onnx``."""
    return path if width >= 1.0 else path.with_name(f"{path.stem}.width_{width_name(width)}{path.suffix}")


def weights_path(path: Path) -> Path:
    return path.with_suffix(WEIGHTS_SUFFIX)


def export_widths(net: SlimmableNet, example_inputs: Inputs, path: Path, encodings: dict[str, TensorEncoding], dynamic_axes: DynamicAxes | None = None) -> int:
    """Write one graph per width and the shared weight file; returns the bytes of all of them (what ships)."""
    net = attached(net.eval(), example_inputs)
    graphs = []
    for index in range(len(net.widths)):
        view = WidthView(net, index, example_inputs).eval()
        graph = export_module(view, example_inputs, ["logits"], encodings, dynamic_axes=dynamic_axes, wrapped=True, fold_constants=False)
        fold_index_arithmetic(graph)
        graph = pack_int4(graph)
        record_deployment(graph)
        graphs.append(graph)
    paths = [width_path(path, width) for width in net.widths]
    share_weights(graphs, weights_path(path))
    for graph, file in zip(graphs, paths):
        onnx.save(graph, os.fspath(file))
        onnx.checker.check_model(os.fspath(file))
    return sum(os.path.getsize(file) for file in [*paths, weights_path(path)])


def fold_index_arithmetic(graph_model: onnx.ModelProto) -> None:
    """Compute, once, what the exporter left as nodes on constants alone (without constant folding, every ``narrow`` of a
    weight became a dozen ``Constant``, ``Add`` and ``Unsqueeze`` nodes: 10 KB a width on LeNet-5), so a narrower graph
    holds its slices' bounds as small initializers. Nothing that reads a weight or an input is touched."""
    from onnx.reference import ReferenceEvaluator

    graph = graph_model.graph
    variable = {value.name for value in graph.input} | {initializer.name for initializer in graph.initializer}
    foldable: list[onnx.NodeProto] = []
    produced: set[str] = set()
    for node in graph.node:  # in topological order, as exported
        if node.op_type == "Constant" or (node.input and all(name in produced for name in node.input if name)):
            if not any(name in variable for name in node.input):
                foldable.append(node)
                produced.update(node.output)
                continue
        variable.update(node.output)
    needed = sorted({name for node in graph.node if node not in foldable for name in node.input if name in produced})
    if not needed:
        return
    evaluator = ReferenceEvaluator(onnx.helper.make_model(
        onnx.helper.make_graph(foldable, "constants", [], [onnx.helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in needed]),
        opset_imports=graph_model.opset_import,
    ))
    values = evaluator.run(None, {})
    kept = [node for node in graph.node if node not in foldable]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(value), name) for name, value in zip(needed, values))


SHAPE_TYPES = (TensorProto.INT64, TensorProto.INT32)


def share_weights(graphs: list[onnx.ModelProto], weights: Path) -> None:
    """Move the widest graph's initializers (``graphs[-1]``) into ``weights``, once, and point every graph's identical
    initializer at the same bytes; what only a narrower graph holds (its BatchNorm statistics) stays inside it, and so do
    integer tensors (shapes, axes, indices: ONNX Runtime's shape inference reads them when it loads the graph and cannot
    read them from external data)."""
    stored: dict[str, tuple[int, bytes]] = {}  # name -> (offset, bytes)
    with open(weights, "wb") as file:
        for initializer in graphs[-1].graph.initializer:
            if initializer.data_type in SHAPE_TYPES:
                continue
            data = raw_bytes(initializer)
            stored[initializer.name] = (file.tell(), data)
            file.write(data)
    for graph in graphs:
        for initializer in graph.graph.initializer:
            name = initializer.name
            if name not in stored or raw_bytes(initializer) != stored[name][1]:
                continue
            offset, data = stored[name]
            dims, data_type = list(initializer.dims), initializer.data_type
            initializer.Clear()
            initializer.name, initializer.data_type = name, data_type
            initializer.dims.extend(dims)
            for key, value in (("location", weights.name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = initializer.external_data.add()
                entry.key, entry.value = key, value
            initializer.data_location = TensorProto.EXTERNAL


def raw_bytes(initializer: onnx.TensorProto) -> bytes:
    """The tensor's bytes as ONNX stores them (``raw_data``: 4-bit codes packed two to a byte)."""
    if initializer.HasField("raw_data"):
        return initializer.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(initializer), initializer.name).raw_data


def all_width_files(path: Path, widths: tuple[float, ...]) -> list[Path]:
    """Every file a slimmable export writes: the graphs, widest last, and the weights."""
    return [width_path(path, width) for width in widths] + [weights_path(path)]

