import multiprocessing
import statistics

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from netshrink.search.measure import LatencySettings, export_onnx, measure_latency_ms, onnx_accuracy, ort_session
from netshrink.tasks.models import LeNet5
from netshrink.techniques import Pipeline, PruningConfig, QuantizationConfig, compress

X = torch.zeros(1, 1, 28, 28)


def exported(tmp_path, pipeline, name="m.onnx"):
    compressed = compress(LeNet5().eval(), pipeline, X)
    path = tmp_path / name
    export_onnx(compressed.model, X, path, compressed.encodings)
    return compressed, path


def test_int8_weights_are_int8_initializers_in_the_onnx_graph(tmp_path):
    compressed, path = exported(tmp_path, Pipeline(steps=[QuantizationConfig(bits=8)]))
    graph = onnx.load(path).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    assert initializers["fc1.weight_int8"].dtype == np.int8
    assert "fc1.weight" not in initializers
    assert sum(node.op_type == "DequantizeLinear" for node in graph.node) == 4
    fp32 = exported(tmp_path, Pipeline(), "fp32.onnx")[1]
    assert path.stat().st_size < 0.3 * fp32.stat().st_size


def test_sixteen_bit_weights_are_float16_initializers(tmp_path):
    _, path = exported(tmp_path, Pipeline(steps=[QuantizationConfig(bits=16)]))
    initializers = {init.name: numpy_helper.to_array(init) for init in onnx.load(path).graph.initializer}
    assert initializers["conv2.weight_fp16"].dtype == np.float16


@pytest.mark.parametrize(
    "pipeline",
    [
        Pipeline(),
        Pipeline(steps=[QuantizationConfig(bits=8)]),
        Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5), QuantizationConfig(bits=16)]),
        Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.7), QuantizationConfig(bits=8)]),
    ],
    ids=["fp32", "int8", "channel+fp16", "weight+int8"],
)
def test_onnx_runtime_computes_what_torch_computes(tmp_path, pipeline):
    compressed, path = exported(tmp_path, pipeline)
    batch = torch.randn(8, 1, 28, 28)
    expected = compressed.model(batch).detach().numpy()
    got = ort_session(path).run(None, {"input": batch.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    dataset = torch.utils.data.TensorDataset(batch, torch.arange(8) % 10)
    assert onnx_accuracy(path, dataset) == float((expected.argmax(1) == (torch.arange(8) % 10).numpy()).mean())


def _measure(path, queue):
    torch.set_num_threads(1)
    queue.put(measure_latency_ms(path, (1, 28, 28), LatencySettings(threads=1, warmup=30, repeats=200)))


def test_concurrent_measurements_of_the_same_model_agree_within_ten_percent(tmp_path):
    """Two processes (as two concurrent trials would be) measure one model at the same time."""
    _, path = exported(tmp_path, Pipeline())
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_measure, args=(str(path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join()
    assert max(results) / min(results) < 1.10, results


def test_channel_pruning_is_measurably_faster_and_weight_pruning_is_not(tmp_path):
    settings = LatencySettings(warmup=30, repeats=200)
    latency = {}
    for name, pipeline in {
        "dense": Pipeline(),
        "channel": Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.75)]),
        "weight": Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.75)]),
    }.items():
        _, path = exported(tmp_path, pipeline, f"{name}.onnx")
        latency[name] = statistics.median(measure_latency_ms(path, (1, 28, 28), settings) for _ in range(3))
    assert latency["channel"] < 0.7 * latency["dense"], latency
    assert 0.8 < latency["weight"] / latency["dense"] < 1.25, latency


def test_folding_int8_weights_removes_the_per_call_dequantization_cost(tmp_path):
    _, path = exported(tmp_path, Pipeline(steps=[QuantizationConfig(bits=8)]))
    _, dense = exported(tmp_path, Pipeline(), "dense.onnx")
    settings = dict(warmup=30, repeats=200)
    folded = statistics.median(measure_latency_ms(path, (1, 28, 28), LatencySettings(fold_int8_weights=True, **settings)) for _ in range(3))
    per_call = statistics.median(measure_latency_ms(path, (1, 28, 28), LatencySettings(**settings)) for _ in range(3))
    fp32 = statistics.median(measure_latency_ms(dense, (1, 28, 28), LatencySettings(**settings)) for _ in range(3))
    assert folded < per_call
    assert 0.8 < folded / fp32 < 1.25, (folded, fp32)
