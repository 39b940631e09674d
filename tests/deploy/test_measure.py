import contextlib
import multiprocessing
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from netshrink import node_lock
from netshrink.deploy import measure
from netshrink.config import MeasureSettings
from netshrink.deploy.onnx_export import deployment_config
from netshrink.deploy.measure import throughput, measure_latency, measure_relative_latency, onnx_evaluate, ort_session
from netshrink.deploy.onnx_export import export_onnx
from netshrink.tasks.models import LeNet5
from netshrink.techniques import Pipeline, PruningConfig, QuantizationConfig, compress

X = torch.zeros(1, 1, 28, 28)

ONE_SAMPLE = [{"input": np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)}]  # one call's feed


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


@pytest.mark.parametrize("bits, dtype", [(8, np.int8), (16, np.float16)])
def test_a_transformers_linears_are_stored_at_their_width_though_the_exporter_transposes_them(tmp_path, bits, dtype):
    """A Linear on 3-D tokens exports as MatMul on a transposed, renamed copy of its weight: still stored reduced."""
    from netshrink.tasks.models import vit

    model = vit(num_classes=10, in_channels=1, image_size=8).eval()
    x = torch.zeros(1, 1, 8, 8)
    compressed = compress(model, Pipeline(steps=[QuantizationConfig(bits=bits)]), x)
    path, fp32 = tmp_path / "q.onnx", tmp_path / "fp32.onnx"
    export_onnx(compressed.model, x, path, compressed.encodings)
    export_onnx(model, x, fp32, {})
    graph = onnx.load(path).graph
    stored = [numpy_helper.to_array(init) for init in graph.initializer]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(array.dtype == dtype and array.ndim == 2 for array in stored) == len(linears)  # every Linear, MatMul or Gemm
    assert max(array.size for array in stored if array.dtype == np.float32) < 64 * 64  # no float weight matrix left
    assert path.stat().st_size < (0.4 if bits == 8 else 0.6) * fp32.stat().st_size


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
    assert onnx_evaluate(path, dataset).value == float((expected.argmax(1) == (torch.arange(8) % 10).numpy()).mean())


def _train_until_stopped(ready, stop):
    """A neighbour trial: trains LeNet-5 through netshrink's training loop until told to stop."""
    torch.set_num_threads(1)
    from netshrink.training import train

    data = torch.utils.data.TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
    model = LeNet5()
    ready.set()
    while not stop.is_set():
        train(model, data, epochs=1, lr=1e-3, batch_size=32, seed=0)


def test_a_training_neighbour_does_not_disturb_the_measurement(tmp_path):
    """Concurrent trials: one trains while the other times a model against the same model as reference."""
    _, path = exported(tmp_path, Pipeline())
    _, reference = exported(tmp_path, Pipeline(), "reference.onnx")
    settings = MeasureSettings()
    alone = [measure_relative_latency(path, reference, ONE_SAMPLE, settings).ratio for _ in range(3)]
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    neighbour = context.Process(target=_train_until_stopped, args=(ready, stop))
    neighbour.start()
    try:
        assert ready.wait(timeout=120)
        time.sleep(1.0)  # let it reach steady training
        beside = [measure_relative_latency(path, reference, ONE_SAMPLE, settings).ratio for _ in range(3)]
    finally:
        stop.set()
        neighbour.join(timeout=60)
    figures = alone + beside  # as trial latencies they are these ratios times one baseline figure
    assert max(figures) / min(figures) < 1.10, (alone, beside)
    assert all(0.93 < ratio < 1.07 for ratio in figures), (alone, beside)


def _recording(context_manager, intervals):
    """``context_manager`` that appends to ``intervals`` the monotonic-clock span spent inside it."""

    @contextlib.contextmanager
    def recorded():
        with context_manager():
            start = time.monotonic()  # CLOCK_MONOTONIC: one clock for all processes of the machine
            yield
            intervals.append((start, time.monotonic()))

    return recorded


def _train_recording_steps(lock_enabled, steps_taken, stop, spans_back):
    """A neighbour trial that trains until told to stop, counts its training steps and sends back the span of each."""
    torch.set_num_threads(1)
    from netshrink import training

    spans = []
    recorded = _recording(training.compute_slot if lock_enabled else contextlib.nullcontext, spans)

    @contextlib.contextmanager
    def counted():
        with recorded():
            yield
        with steps_taken.get_lock():
            steps_taken.value += 1

    training.compute_slot = counted
    data = torch.utils.data.TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
    model = LeNet5()
    while not stop.is_set():
        training.train(model, data, epochs=1, lr=1e-3, batch_size=32, seed=0)
    spans_back.put(spans)


def _await_steps(neighbour, steps_taken, count, timeout=120.0):
    deadline = time.monotonic() + timeout
    while steps_taken.value < count:
        assert neighbour.is_alive() and time.monotonic() < deadline, f"the neighbour took {steps_taken.value} training steps, not {count}"
        time.sleep(0.005)


def _neighbour_steps_and_measurements(tmp_path, monkeypatch, lock_enabled):
    """Time a model three times while a neighbour process trains; the spans of its steps and of the timed parts.

    The neighbour takes steps before, between and after the measurements: after
    each one, two more steps are awaited, and the second of them began after it.
    """
    _, path = exported(tmp_path, Pipeline())
    monkeypatch.setenv(node_lock.LOCK_DIR_VARIABLE, str(tmp_path / "locks"))  # the spawned neighbour inherits it
    node_lock.lock_files.cache_clear()
    measurements = []
    quiet = measure.quiet_machine if lock_enabled else contextlib.nullcontext
    monkeypatch.setattr(measure, "quiet_machine", _recording(quiet, measurements))
    context = multiprocessing.get_context("spawn")
    steps_taken, stop, spans_back = context.Value("i", 0), context.Event(), context.Queue()
    neighbour = context.Process(target=_train_recording_steps, args=(lock_enabled, steps_taken, stop, spans_back))
    neighbour.start()
    try:
        _await_steps(neighbour, steps_taken, 1)
        for _ in range(3):
            measure_latency(path, ONE_SAMPLE, MeasureSettings(warmup=20, repeats=400))
            _await_steps(neighbour, steps_taken, steps_taken.value + 2)
        stop.set()
        spans = spans_back.get(timeout=120)  # read before joining: a child with data in a full pipe cannot exit
    finally:
        stop.set()
        neighbour.join(timeout=60)
        node_lock.lock_files.cache_clear()
    return spans, measurements


def _overlapping(spans, measurements):
    return [(step, timed) for step in spans for timed in measurements if step[0] < timed[1] and timed[0] < step[1]]


def test_no_training_step_of_a_neighbour_runs_while_a_model_is_timed(tmp_path, monkeypatch):
    spans, measurements = _neighbour_steps_and_measurements(tmp_path, monkeypatch, lock_enabled=True)
    assert _overlapping(spans, measurements) == []


def test_without_the_lock_training_steps_of_a_neighbour_run_while_a_model_is_timed(tmp_path, monkeypatch):
    """The check above can fail: with the lock disabled, the same scenario overlaps."""
    spans, measurements = _neighbour_steps_and_measurements(tmp_path, monkeypatch, lock_enabled=False)
    assert _overlapping(spans, measurements)


def test_channel_pruning_is_measurably_faster_and_weight_pruning_is_not(tmp_path):
    _, dense = exported(tmp_path, Pipeline(), "dense.onnx")
    ratio = {}
    for name, pipeline in {
        "channel": Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.75)]),
        "weight": Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.75)]),
    }.items():
        _, path = exported(tmp_path, pipeline, f"{name}.onnx")
        ratio[name] = measure_relative_latency(path, dense, ONE_SAMPLE).ratio
    assert ratio["channel"] < 0.7, ratio
    assert 0.9 < ratio["weight"] < 1.1, ratio


def test_a_weight_only_int8_model_is_deployed_and_timed_with_its_weights_folded_once(tmp_path):
    """The file records its deployment's session options (disable_quant_qdq=1); the measurement uses them, and the
    per-call dequantization figure, which ONNX Runtime's defaults would pay, is slower."""
    _, path = exported(tmp_path, Pipeline(steps=[QuantizationConfig(bits=8)]))
    _, dense = exported(tmp_path, Pipeline(), "dense.onnx")
    assert deployment_config(path) == {"session.disable_quant_qdq": "1"} and deployment_config(dense) == {}
    assert ort_session(path).get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"
    folded = measure_relative_latency(path, dense, ONE_SAMPLE, MeasureSettings()).ratio
    per_call = measure_relative_latency(path, dense, ONE_SAMPLE, MeasureSettings(), config={}).ratio
    assert folded < per_call
    assert 0.9 < folded < 1.1, folded


@pytest.mark.parametrize("threads", [1, 2])
def test_measurements_run_on_the_threads_asked_for(tmp_path, threads):
    """measure.threads > 1: every session gets that many intra-op threads; a figure still comes out of the alternation."""
    _, path = exported(tmp_path, Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5)]))
    _, dense = exported(tmp_path, Pipeline(), "dense.onnx")
    settings = MeasureSettings(threads=threads, warmup=5, repeats=400)
    assert ort_session(path, threads).get_session_options().intra_op_num_threads == threads
    assert measure_relative_latency(path, dense, ONE_SAMPLE, settings).ratio < 1.0  # channel pruning is faster at any thread count


def test_throughput_is_timed_in_batches_in_the_same_alternation(tmp_path):
    _, path = exported(tmp_path, Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.75)]))
    _, dense = exported(tmp_path, Pipeline(), "dense.onnx")
    settings = MeasureSettings(warmup=32, repeats=640, batch_size=32)
    batched = measure_relative_latency(path, dense, [{"input": np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)}], settings, batch=32)
    single = measure_latency(dense, ONE_SAMPLE, MeasureSettings(warmup=5, repeats=200))
    assert batched.ratio < 0.8  # a narrower model serves batches faster too
    assert throughput(batched.reference.ms, 32) > throughput(single.ms, 1)  # batching amortises the per-call cost


def test_absolute_latency_reports_its_runs_and_spread(tmp_path):
    _, path = exported(tmp_path, Pipeline())
    latency = measure_latency(path, ONE_SAMPLE, MeasureSettings(warmup=5, repeats=200))
    assert latency.runs == 200
    assert 0 < latency.ms <= latency.median_all_ms <= latency.p90_ms


@pytest.mark.parametrize(
    "pipeline",
    [Pipeline(steps=[QuantizationConfig(bits=bits)]) for bits in (4, 2, 1)]
    + [Pipeline(steps=[PruningConfig(granularity="weight", ratio=0.7), QuantizationConfig(bits=bits)]) for bits in (4, 1)],
    ids=["int4", "int2", "int1", "weight+int4", "weight+int1"],
)
def test_sub_byte_weights_dequantize_in_onnx_to_what_torch_computes(tmp_path, pipeline):
    compressed, path = exported(tmp_path, pipeline)
    bits = pipeline.steps[-1].bits
    graph = onnx.load(path).graph
    packed = next(init for init in graph.initializer if init.name == "fc1.weight_int4")
    assert packed.data_type == onnx.TensorProto.INT4 and len(packed.raw_data) == (np.prod(packed.dims) + 1) // 2  # two codes a byte
    codes = numpy_helper.to_array(packed).astype(np.int8)
    assert np.abs(codes).max() <= max(1, 2 ** (bits - 1) - 1)
    assert sum(node.op_type == "DequantizeLinear" for node in graph.node) == 4
    batch = torch.randn(8, 1, 28, 28)
    expected = compressed.model(batch).detach().numpy()
    got = ort_session(path).run(None, {"input": batch.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
