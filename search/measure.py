"""Measurements of a compressed model: accuracy, artifact size, ONNX Runtime latency.

Latency is measured, never estimated: median wall time of batch-1 inference on
ONNX Runtime's CPU provider with a fixed thread count, after warm-up. Only one
measurement runs at a time on a node (a file lock), so trials that run
concurrently do not disturb each other's figures.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from filelock import FileLock
from onnx import helper, numpy_helper
from torch import nn

from netshrink.techniques import TensorEncoding
from netshrink.techniques.encoding import int8_scales, quantize_int8

OPSET = 17
LATENCY_LOCK = Path(tempfile.gettempdir()) / "netshrink-latency.lock"


@dataclass(frozen=True)
class LatencySettings:
    threads: int = 1
    warmup: int = 50
    repeats: int = 300
    fold_int8_weights: bool = False


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | os.PathLike, encodings: dict[str, TensorEncoding]) -> int:
    """Export ``model`` to a self-contained ONNX file with a dynamic batch axis; returns its size in bytes.

    Weights the plan stores at 8 bits become int8 initializers feeding
    ``DequantizeLinear`` (per output channel); 16-bit weights become float16
    initializers feeding ``Cast``. Sparse weights stay dense: ONNX Runtime's
    CPU kernels are dense, which is why unstructured pruning saves bytes but not time.
    """
    path = os.fspath(path)
    model = model.eval().cpu()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example_inputs.cpu(),),
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    reduced = {name: enc for name, enc in encodings.items() if enc.bits in (8, 16)}
    if reduced:
        graph_model = onnx.load(path)
        store_reduced_precision(graph_model, reduced)
        onnx.save(graph_model, path)
    return os.path.getsize(path)


def store_reduced_precision(graph_model: onnx.ModelProto, encodings: dict[str, TensorEncoding]) -> None:
    graph = graph_model.graph
    nodes = []
    for initializer in list(graph.initializer):
        encoding = encodings.get(initializer.name)
        if encoding is None:
            continue
        weight = torch.from_numpy(numpy_helper.to_array(initializer).copy())
        name = initializer.name
        graph.initializer.remove(initializer)
        if encoding.bits == 8:
            scale = int8_scales(weight)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(quantize_int8(weight, scale).numpy(), f"{name}_int8"),
                    numpy_helper.from_array(scale.numpy().astype(np.float32), f"{name}_scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), f"{name}_zero_point"),
                ]
            )
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"], [name], axis=0, name=f"{name}_dequantize"
                )
            )
        else:
            graph.initializer.append(numpy_helper.from_array(weight.numpy().astype(np.float16), f"{name}_fp16"))
            nodes.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=onnx.TensorProto.FLOAT, name=f"{name}_cast"))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(graph_model)


def ort_session(onnx_path: str | os.PathLike, threads: int = 1, fold_int8_weights: bool = False):
    """An ONNX Runtime CPU session with a fixed thread count.

    By default ORT keeps weight-only ``DequantizeLinear`` nodes and runs them on
    every call; ``fold_int8_weights`` sets ``session.disable_quant_qdq`` so they
    are folded into float32 weights once, at load time.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if fold_int8_weights:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(onnx_path), options, providers=["CPUExecutionProvider"])


def measure_latency_ms(onnx_path: str | os.PathLike, input_shape: tuple[int, ...], settings: LatencySettings = LatencySettings()) -> float:
    """Median batch-1 latency in milliseconds, measured while holding the node's latency lock."""
    session = ort_session(onnx_path, settings.threads, settings.fold_int8_weights)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)}
    with FileLock(LATENCY_LOCK):
        for _ in range(settings.warmup):
            session.run(None, feed)
        timings = []
        for _ in range(settings.repeats):
            start = time.perf_counter()
            session.run(None, feed)
            timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1000.0


def onnx_accuracy(onnx_path: str | os.PathLike, dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of the ONNX model on ``dataset`` (checks that the export computes what torch computed)."""
    session = ort_session(onnx_path, threads=1)
    name = session.get_inputs()[0].name
    correct = count = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    for inputs, labels in loader:
        logits = session.run(None, {name: inputs.numpy().astype(np.float32)})[0]
        correct += int((logits.argmax(axis=1) == labels.numpy()).sum())
        count += len(labels)
    return correct / max(count, 1)
