"""The reference point: the uncompressed model, trained once per task and cached on disk."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import netshrink
from netshrink.config import Experiment, TaskConfig
from netshrink.stats import interval_metrics
from netshrink.tasks import BUILTIN_DATASETS, BUILTIN_MODELS, TaskData, build_model, dataset_digest, example_inputs, factory_sources, load_data
from netshrink.node_lock import compute_slot
from netshrink.techniques import Pipeline, load_artifact, save_artifact
from netshrink.techniques.sensitivity import measure_sensitivity
from netshrink.training import accuracy, train

from netshrink.deploy.measure import measure_latency, measure_latency_ms, throughput
from netshrink.deploy.onnx_export import export_onnx

BASELINE_FILE = "baseline.safetensors"
FINGERPRINT_FILE = "fingerprint.json"  # what the cache key hashes, kept next to the baseline to say why one retrains


@dataclass(frozen=True)
class Baseline:
    """The trained, uncompressed model's weights (as stored on disk) and its measured metrics."""

    artifact: Path
    sensitivity: dict  # per-layer loss rise at each width (``techniques.sensitivity``), for allocation: sensitivity
    metrics: dict[str, float]  # accuracy, test_accuracy (and their 95% intervals), size_bytes, latency_ms, onnx_bytes, parameters, val_samples, test_samples
    trained_now: bool


def baseline_fingerprint(task: TaskConfig, data: TaskData, search_path: str) -> dict[str, Any]:
    """Everything that determines the trained baseline; its hash is the cache key.

    The task section (dataset, model, their arguments, training settings); the
    source of the dataset and model factories (see ``factory_sources``); the
    contents of the three splits (``dataset_digest``); and the torch and
    netshrink versions, since the same code and data train differently under
    another version. Change any of them and the baseline trains again.
    """
    return {
        "task": task.model_dump(mode="json"),
        "dataset_source": factory_sources(task.dataset, BUILTIN_DATASETS, search_path),
        "model_source": factory_sources(task.model, BUILTIN_MODELS, search_path),
        "data": {split: dataset_digest(getattr(data, split)) for split in ("train", "val", "test")},
        "torch": torch.__version__,
        "netshrink": netshrink.__version__,
    }


def baseline_key(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def what_changed(cache_dir: Path, fingerprint: dict[str, Any]) -> list[str]:
    """Parts of the fingerprint that differ from the cached baselines of the same task section (for the log line)."""
    changed: set[str] = set()
    for path in cache_dir.glob(f"*/{FINGERPRINT_FILE}"):
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if cached.get("task") == fingerprint["task"]:
            changed |= {part for part, value in fingerprint.items() if cached.get(part) != value}
    return sorted(changed)


def prepare_baseline(experiment: Experiment, cache_dir: Path, search_path: str, log=print) -> Baseline:
    """Train the baseline unless a model with this exact fingerprint (``baseline_fingerprint``) is cached.

    Latency is re-measured every time because it belongs to the machine, not to the model.
    """
    task = experiment.task
    data = load_data(task.dataset, task.dataset_args, search_path)
    model = build_model(task.model, task.model_args, data, search_path)
    fingerprint = baseline_fingerprint(task, data, search_path)
    folder = cache_dir / baseline_key(fingerprint)
    artifact = folder / BASELINE_FILE
    trained_now = not artifact.is_file()
    if trained_now:
        changed = what_changed(cache_dir, fingerprint)
        why = f" (a cached baseline of this task section exists, but its {', '.join(changed)} changed)" if changed else ""
        log(f"Training the baseline {task.model} on {task.dataset} for {task.train.epochs} epochs{why} (cached in {folder}) ...")
        torch.manual_seed(task.train.seed)
        model = build_model(task.model, task.model_args, data, search_path)
        train(model, data.train, epochs=task.train.epochs, lr=task.train.lr, batch_size=task.train.batch_size, seed=task.train.seed)
        folder.mkdir(parents=True, exist_ok=True)
        partial = artifact.with_suffix(".partial")
        save_artifact(partial, model, {}, Pipeline().recipe())
        (folder / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
        partial.replace(artifact)  # atomic: a crash mid-write never leaves a half baseline behind
    else:
        log(f"Using the cached baseline {artifact}")
    model = load_artifact(artifact, model).model
    metrics = measure_baseline(model, data, artifact, folder, experiment)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return Baseline(artifact=artifact, sensitivity=cached_sensitivity(model, data, folder), metrics=metrics, trained_now=trained_now)


SENSITIVITY_FILE = "sensitivity.json"
SENSITIVITY_SAMPLES = 1024  # training samples the loss is taken on (all of the built-in task's 1,078 but a few)


def cached_sensitivity(model: torch.nn.Module, data: TaskData, folder: Path) -> dict:
    """The baseline's per-layer sensitivity, measured once (a few seconds for LeNet-5) and kept next to it.

    On the training split: the validation split selects the front and the test split
    stays held out, so neither may steer the allocation.
    """
    path = folder / SENSITIVITY_FILE
    if path.is_file():
        return json.loads(path.read_text())
    count = len(data.train)
    indices = sorted({round(i * (count - 1) / max(SENSITIVITY_SAMPLES - 1, 1)) for i in range(min(count, SENSITIVITY_SAMPLES))})
    samples = [data.train[index] for index in indices]
    inputs = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in samples])
    labels = torch.tensor([int(y) for _, y in samples])
    with compute_slot():
        scores = measure_sensitivity(model, inputs, labels)
    path.write_text(json.dumps(scores, indent=2))
    return json.loads(path.read_text())  # widths as JSON keys (strings), as a cached file gives them


def measure_baseline(model: torch.nn.Module, data: TaskData, artifact: Path, folder: Path, experiment: Experiment) -> dict[str, float]:
    onnx_path = folder / "baseline.onnx"
    onnx_bytes = export_onnx(model, example_inputs(data), onnx_path, {})
    settings = experiment.measure
    scores = {"accuracy": accuracy(model, data.val), "test_accuracy": accuracy(model, data.test)}
    if "throughput" in experiment.objectives:  # samples per second in batches of measure.batch_size
        batched = measure_latency(onnx_path, data.input_shape, settings, batch=settings.batch_size)
        scores["throughput"] = throughput(batched.ms, settings.batch_size)
    return {
        **scores,
        **interval_metrics("accuracy", scores["accuracy"], len(data.val)),
        **interval_metrics("test_accuracy", scores["test_accuracy"], len(data.test)),
        "size_bytes": float(artifact.stat().st_size),
        "latency_ms": measure_latency_ms(onnx_path, data.input_shape, settings),
        "onnx_bytes": float(onnx_bytes),
        "parameters": float(sum(p.numel() for p in model.parameters())),
        # the split sizes, for the accuracies' confidence intervals
        "val_samples": float(len(data.val)),
        "test_samples": float(len(data.test)),
    }
