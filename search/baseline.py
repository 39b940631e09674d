"""The reference point: the uncompressed model, trained once per task and cached on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from netshrink.config import Experiment, baseline_key
from netshrink.tasks import TaskData, build_model, example_inputs, load_data
from netshrink.techniques import Pipeline, load_artifact, save_artifact
from netshrink.training import accuracy, train

from .measure import LatencySettings, measure_latency_ms
from .onnx_export import export_onnx

BASELINE_FILE = "baseline.safetensors"


@dataclass(frozen=True)
class Baseline:
    """The trained, uncompressed model's weights (as stored on disk) and its measured metrics."""

    artifact: Path
    metrics: dict[str, float]  # accuracy, test_accuracy, size_bytes, latency_ms, onnx_bytes
    trained_now: bool

    def load_into(self, model: nn.Module) -> nn.Module:
        return load_artifact(self.artifact, model)[0]


def prepare_baseline(experiment: Experiment, cache_dir: Path, search_path: str, log=print) -> Baseline:
    """Train the baseline unless a model for this exact task and training setup is cached.

    The cache key hashes the task (dataset, model, their arguments and the
    training settings). Latency is re-measured every time because it belongs to
    the machine, not to the model.
    """
    task = experiment.task
    folder = cache_dir / baseline_key(task)
    artifact = folder / BASELINE_FILE
    data = load_data(task.dataset, task.dataset_args, search_path)
    model = build_model(task.model, task.model_args, data, search_path)
    trained_now = not artifact.is_file()
    if trained_now:
        log(f"Training the baseline {task.model} on {task.dataset} for {task.train.epochs} epochs (cached in {folder}) ...")
        torch.manual_seed(task.train.seed)
        model = build_model(task.model, task.model_args, data, search_path)
        train(model, data.train, epochs=task.train.epochs, lr=task.train.lr, batch_size=task.train.batch_size, seed=task.train.seed)
        folder.mkdir(parents=True, exist_ok=True)
        partial = artifact.with_suffix(".partial")
        save_artifact(partial, model, {}, Pipeline().recipe())
        partial.replace(artifact)  # atomic: a crash mid-write never leaves a half baseline behind
    else:
        log(f"Using the cached baseline {artifact}")
    model = load_artifact(artifact, model)[0]
    metrics = measure_baseline(model, data, artifact, folder, experiment)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return Baseline(artifact=artifact, metrics=metrics, trained_now=trained_now)


def measure_baseline(model: nn.Module, data: TaskData, artifact: Path, folder: Path, experiment: Experiment) -> dict[str, float]:
    onnx_path = folder / "baseline.onnx"
    onnx_bytes = export_onnx(model, example_inputs(data), onnx_path, {})
    settings = LatencySettings(**experiment.measure.model_dump())
    return {
        "accuracy": accuracy(model, data.val),
        "test_accuracy": accuracy(model, data.test),
        "size_bytes": float(artifact.stat().st_size),
        "latency_ms": measure_latency_ms(onnx_path, data.input_shape, settings),
        "onnx_bytes": float(onnx_bytes),
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }
