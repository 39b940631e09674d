"""Static int8 (``quantization.activations: int8``): fake-quantized activations while fine-tuning, a QDQ model that
ONNX Runtime runs with integer kernels, and the same accuracy in torch and in ONNX Runtime."""

import math

import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from netshrink.config import FinetuneSettings, MeasureSettings, TaskConfig
from netshrink.deploy import evaluate
from netshrink.deploy.onnx_export import deployment_config
from netshrink.tasks import build_model, load_data
from netshrink.techniques import EarlyExitConfig, Pipeline, QuantizationConfig, compress, load_artifact, save_artifact
from netshrink.techniques.activations import ActivationQuant, quantized_layers
from netshrink.training import train

INT8 = QuantizationConfig(bits=8, activations="int8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LeNet-5 trained briefly on the built-in digits, stored as a baseline artifact."""
    task = TaskConfig()
    data = load_data(task.dataset, task.dataset_args)
    torch.manual_seed(0)
    model = build_model(task.model, task.model_args, data)
    train(model, data.train, epochs=5, lr=1e-3, batch_size=64, seed=0)
    baseline = tmp_path_factory.mktemp("baseline") / "baseline.safetensors"
    save_artifact(baseline, model, {}, Pipeline().recipe())
    return task, data, baseline


@pytest.fixture(scope="module")
def int8_trial(trained, tmp_path_factory):
    task, data, baseline = trained
    setup = evaluate.RecipeSetup(
        task=task,
        finetune=FinetuneSettings(epochs=1),
        measure=MeasureSettings(warmup=20, repeats=200),
        seed=0,
        cpus=1,
        search_path=".",
        baseline_weights=baseline.read_bytes(),
        baseline_metrics={"accuracy": 0.97, "size_bytes": float(baseline.stat().st_size), "latency_ms": 0.1},
    )
    workdir = tmp_path_factory.mktemp("trial")
    return evaluate.evaluate_recipe(setup, Pipeline(steps=[INT8]), workdir), workdir


def test_onnx_runtime_and_torch_agree_on_a_static_int8_model(int8_trial):
    metrics, _ = int8_trial
    assert metrics["accuracy"] > 0.9
    assert abs(metrics["onnx_accuracy"] - metrics["accuracy"]) <= 0.005, metrics


def test_onnx_runtime_runs_a_static_int8_model_with_integer_kernels(int8_trial, tmp_path):
    _, workdir = int8_trial
    path = workdir / evaluate.ONNX_FILE
    assert deployment_config(path) == {}  # QDQ on activations: the defaults, under which ONNX Runtime fuses them
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert {"QLinearConv", "QGemm"} <= ops, ops
    assert "Conv" not in ops and "Gemm" not in ops  # no layer left in float


def test_the_activation_ranges_travel_in_the_artifact(int8_trial, trained):
    task, data, _ = trained
    _, workdir = int8_trial
    loaded = load_artifact(workdir / evaluate.ARTIFACT_FILE, build_model(task.model, task.model_args, data))
    quants = quantized_layers(loaded.model)
    layers = {name for name, m in loaded.model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(quants) == layers and len(layers) >= 4
    assert all(float(q.high) > float(q.low) for q in quants.values())
    assert math.isclose(float(quants["fc2"].low), 0.0) and float(quants["fc1"].low) < 0  # fc2 reads fc1's ReLU: nothing negative


def test_fake_quantization_rounds_to_the_uint8_grid_and_passes_the_gradient_through():
    quant = ActivationQuant()
    quant.low.fill_(-1.0)
    quant.high.fill_(1.0)
    x = torch.linspace(-2, 2, 101, requires_grad=True)
    y = quant(x)
    scale = 2.0 / 255
    assert torch.all(torch.abs(y[(x.abs() <= 1).detach()] - x[(x.abs() <= 1).detach()]) <= scale / 2 + 1e-6)
    assert float(y.detach().max()) <= 1.0 + scale and float(y.detach().min()) >= -1.0 - scale  # clipped to the range
    assert len(torch.unique(y.detach())) < len(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("config", [{"bits": 4, "activations": "int8"}, {"allocation": "sensitivity", "activations": "int8"}])
def test_int8_activations_need_uniform_int8_weights(config):
    with pytest.raises(ValidationError, match="activations int8 needs int8 weights"):
        QuantizationConfig(**config)


def test_an_early_exit_model_keeps_float_activations_and_says_so():
    from netshrink.tasks.models import LeNet5

    compressed = compress(LeNet5().eval(), Pipeline(steps=[EarlyExitConfig(), INT8]), torch.zeros(1, 1, 28, 28))
    assert compressed.pipeline.steps[-1].activations == "float"
    assert any("activations left float" in note for note in compressed.notes)
    assert not quantized_layers(compressed.model)
