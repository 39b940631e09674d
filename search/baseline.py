"""The reference point: the uncompressed model, trained once per task and cached on disk."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import netshrink
from netshrink.config import Experiment
from netshrink.deploy.evaluate import epoch_line, split_scores, step_line
from netshrink.integrity import bytes_sha256, file_sha256, mismatch, recorded_checksum, unreadable, write_checksum
from netshrink.tasks import BUILTIN_DATASETS, BUILTIN_MODELS, dataset_digest, factory_sources
from netshrink.tasks.task import Task, load_task
from netshrink.node_lock import compute_slot, exclusive_file
from netshrink.techniques import Pipeline, load_artifact, save_artifact
from netshrink.techniques.sensitivity import measure_sensitivity
from netshrink.training import train

from netshrink.deploy.measure import measure_latency, measure_latency_ms, throughput
from netshrink.deploy.onnx_export import export_onnx
from netshrink.devices import trial_device

BASELINE_FILE = "baseline.safetensors"
METRICS_FILE = "metrics.json"
FINGERPRINT_FILE = "fingerprint.json"  # what the cache key hashes, kept next to the baseline to say why one retrains


@dataclass(frozen=True)
class Baseline:
    """The trained, uncompressed model's weights (as stored on disk) and its measured metrics."""

    artifact: Path
    weights: bytes  # the artifact's bytes, as read once its SHA-256 was checked
    sensitivity: dict  # per-layer loss rise at each width (``techniques.sensitivity``), for allocation: sensitivity
    metrics: dict[str, float]  # accuracy, test_accuracy (and their 95% intervals), size_bytes, latency_ms, onnx_bytes, parameters, val_samples, test_samples
    trained_now: bool


def baseline_fingerprint(task: Task) -> dict[str, Any]:
    """Everything that determines the trained baseline; its hash is the cache key.

    The task section (dataset, model, their arguments, loss, metric, training settings); the
    SHA-256 of ``task.weights``; the source of the dataset and model factories (see
    ``factory_sources``); the contents of the three splits (``dataset_digest``); and the torch and
    netshrink versions, since the same code and data train differently under another version.
    Change any of them and the baseline trains again.
    """
    config, search_path = task.config, task.search_path
    weights = task.weights_file()
    return {
        "task": config.model_dump(mode="json"),
        "weights": file_sha256(weights) if weights else None,
        "dataset_source": factory_sources(config.dataset, BUILTIN_DATASETS, search_path),
        "model_source": factory_sources(config.model, BUILTIN_MODELS, search_path),
        "data": {split: dataset_digest(getattr(task.data, split)) for split in ("train", "val", "test")},
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

    With ``task.train.epochs: 0`` the baseline is the factory's model with ``task.weights`` loaded, as it is.
    Latency is re-measured every time because it belongs to the machine, not to the model.
    """
    settings = experiment.task.train
    task = load_task(experiment.task, search_path, num_workers=settings.num_workers)
    fingerprint = baseline_fingerprint(task)
    folder = cache_dir / baseline_key(fingerprint)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # one search at a time trains, measures and writes a baseline; a second one started meanwhile waits, then uses it
    waiting = f"Waiting for another search, which is preparing this baseline ({folder}) ..."
    with exclusive_file(cache_dir / f"{folder.name}.lock", waiting, log):
        return _prepare(experiment, task, fingerprint, folder, log)


def _prepare(experiment: Experiment, task: Task, fingerprint: dict[str, Any], folder: Path, log) -> Baseline:
    settings, config, cache_dir = experiment.task.train, task.config, folder.parent
    artifact = folder / BASELINE_FILE
    weights, damaged = cached_weights(artifact)
    trained_now = weights is None
    model = task.build_model()
    if trained_now:
        if damaged:
            why = f" (the cached {artifact} {damaged})"
        else:
            changed = what_changed(cache_dir, fingerprint)
            why = f" (a cached baseline of this task section exists, but its {', '.join(changed)} changed)" if changed else ""
        for derived in (folder / SENSITIVITY_FILE, folder / METRICS_FILE):  # measured on the old file
            derived.unlink(missing_ok=True)
        torch.manual_seed(settings.seed)
        model = task.build_model(weights=True)
        if settings.epochs > 0:
            log(f"Training the baseline {config.model} on {config.dataset} for {settings.epochs} epochs{why} (cached in {folder}) ...")
            train(
                model, task.data.train, epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed,
                device=trial_device(experiment.resources.gpu), loss_fn=task.loss, batches=task.batches, settings=settings,
                on_epoch=epoch_line("baseline", task.metric.name, print_fn=log), on_step=step_line("baseline training", print_fn=log),
            )
        else:
            log(f"Baseline: {config.model} with {config.weights or 'its factory weights'}, not trained (task.train.epochs: 0){why}; cached in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        partial = artifact.with_suffix(".partial")
        save_artifact(partial, model, {}, Pipeline().recipe())
        (folder / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
        partial.replace(artifact)  # atomic: a crash mid-write never leaves a half baseline behind
        weights = artifact.read_bytes()
        write_checksum(artifact, bytes_sha256(weights))  # a crash before this line leaves a file with no checksum: trained again
    else:
        log(f"Using the cached baseline {artifact}")
    model = load_artifact(artifact, model).model
    log("Measuring the baseline (metric on validation and test, ONNX export, latency) ...")
    metrics = measure_baseline(model, task, artifact, folder, experiment)
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    sensitivity = cached_sensitivity(model, task, folder, log) if uses_sensitivity(experiment) else {}
    return Baseline(artifact=artifact, weights=weights, sensitivity=sensitivity, metrics=metrics, trained_now=trained_now)


def cached_weights(artifact: Path) -> tuple[bytes | None, str]:
    """The cached baseline's bytes, read once, when their SHA-256 is the one recorded beside them
    (``baseline.safetensors.sha256``) when the file was written; else None and why it cannot be used, in words
    ("" when there is no cached baseline). A file whose bytes were zeroed, truncated or unreadable, or that has no
    recorded hash, is trained again, never used.
    """
    if not artifact.is_file():
        return None, ""
    expected = recorded_checksum(artifact)
    if expected is None:
        return None, "has no recorded SHA-256 (written by an older netshrink, or cut short), so it cannot be trusted"
    try:
        weights = artifact.read_bytes()
    except OSError as error:
        return None, f"is damaged: {unreadable(error)}"
    problem = mismatch(bytes_sha256(weights), expected)
    return (None, f"is damaged: {problem}") if problem else (weights, "")


def uses_sensitivity(experiment: Experiment) -> bool:
    """Whether the space may draw ``allocation: sensitivity`` (quantization or clustering): only then is the
    per-layer sensitivity worth its passes (13 minutes on a ResNet-18 of 600 samples)."""
    for kind in ("quantization", "clustering"):
        space = experiment.space.techniques().get(kind)
        if space is not None and space.enabled is not False and '"sensitivity"' in space.model_dump_json():
            return True
    return False


SENSITIVITY_FILE = "sensitivity.json"
SENSITIVITY_SAMPLES = 1024  # training samples the loss is taken on (all of the built-in task's 1,078 but a few)
SENSITIVITY_LEAST = 128  # ... and never fewer, however slow the model (a ResNet-18 at 32x32 on 2 cores: 256 took 7 minutes)
SENSITIVITY_SECONDS = 120.0  # a model too slow for 1,024 samples in about this long is scored on fewer


def affordable_samples(model: torch.nn.Module, task: Task, train_split) -> int:
    """How many samples the sensitivity can take in about ``SENSITIVITY_SECONDS`` (one pass per layer and width, 10 per
    layer), between ``SENSITIVITY_LEAST`` and ``SENSITIVITY_SAMPLES``: a ResNet-18 would take 25 minutes on 1,024 of
    its 32x32 images on 2 cores, LeNet-5 seconds. Timed on one batch of the first samples."""
    from netshrink.techniques.base import compressible_weights
    from netshrink.techniques.inputs import forward_logits

    probe = list(range(min(len(train_split), 64)))
    inputs, _ = task.batches.collated(train_split, probe)
    started = time.perf_counter()
    with torch.no_grad():
        forward_logits(model.eval(), inputs)
    per_sample = (time.perf_counter() - started) / len(probe)
    passes = 10 * len(compressible_weights(model)) + 1
    return int(min(SENSITIVITY_SAMPLES, max(SENSITIVITY_LEAST, SENSITIVITY_SECONDS / max(passes * per_sample, 1e-9))))


def cached_sensitivity(model: torch.nn.Module, task: Task, folder: Path, log=print) -> dict:
    """The baseline's per-layer sensitivity, measured once (a few seconds for LeNet-5) and kept next to it.

    On the training split: the validation split selects the front and the test split
    stays held out, so neither may steer the allocation.
    """
    path = folder / SENSITIVITY_FILE
    if path.is_file():
        return json.loads(path.read_text())
    train_split = task.data.train
    count = len(train_split)
    wanted = min(count, affordable_samples(model, task, train_split))
    indices = sorted({round(i * (count - 1) / max(wanted - 1, 1)) for i in range(wanted)})
    batches = [task.batches.collated(train_split, indices[start : start + 256]) for start in range(0, len(indices), 256)]
    fewer = f" (fewer than {SENSITIVITY_SAMPLES}, so that it takes about {SENSITIVITY_SECONDS:.0f} s)" if wanted < min(count, SENSITIVITY_SAMPLES) else ""
    log(f"Measuring per-layer sensitivity on {len(indices)} training samples{fewer} (for allocation: sensitivity) ...")
    started = time.perf_counter()

    def progress(done: int, total: int, layer: str) -> None:
        seconds = time.perf_counter() - started
        if seconds >= 5 or done == total:
            log(f"  sensitivity: layer {done}/{total} ({layer}), {seconds:.0f} s, about {seconds / done * (total - done):.0f} s to go")

    with compute_slot():
        scores = measure_sensitivity(model, batches, task.loss, progress)
    path.write_text(json.dumps(scores, indent=2))
    return json.loads(path.read_text())  # widths as JSON keys (strings), as a cached file gives them


def measure_baseline(model: torch.nn.Module, task: Task, artifact: Path, folder: Path, experiment: Experiment) -> dict[str, float]:
    onnx_path = folder / "baseline.onnx"
    onnx_bytes = export_onnx(model, task.example(), onnx_path, {}, task.dynamic_axes())
    settings = experiment.measure
    scores = split_scores(task, model)
    data = task.data
    if "throughput" in experiment.objectives:  # samples per second in batches of measure.batch_size
        batch = settings.batch_size
        batched = measure_latency(onnx_path, task.batches.feeds(data.val, batch, limit=batch), settings, batch=batch)
        scores["throughput"] = throughput(batched.ms, batch)
    majority = majority_score(model, task)
    if majority is not None:
        scores[f"majority_{task.metric.name}"] = majority
    return {
        **scores,
        "size_bytes": float(artifact.stat().st_size),
        "latency_ms": measure_latency_ms(onnx_path, task.batches.feeds(data.val, 1, limit=1), settings),
        "onnx_bytes": float(onnx_bytes),
        "parameters": float(sum(p.numel() for p in model.parameters())),
        # the split sizes, for the metric's confidence intervals
        "val_samples": float(len(data.val)),
        "test_samples": float(len(data.test)),
    }


def majority_score(model: torch.nn.Module, task: Task) -> float | None:
    """The metric on the validation split of always answering the training split's most frequent class: what a model
    that learned nothing scores. None where the targets are not class labels."""
    from netshrink.tasks.batches import targets_tensor
    from netshrink.training import predict

    targets = targets_tensor([target for _, target in task.batches.batches(task.data.train, 512)])
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dim() != 1 or not len(targets):
        return None
    predictions = predict(model, task.data.val, batches=task.batches)
    most = int(torch.bincount(targets).argmax())
    if most >= predictions.logits.shape[-1]:
        return None
    constant = torch.zeros_like(predictions.logits)
    constant[:, most] = 1.0
    return task.metric(constant, predictions.targets)
