"""Evaluating a recipe end to end: compress the baseline, fine-tune, write the artifact, reload it, export it
to ONNX and measure it. What a trial does, without Ray or MLflow: trials call it, and so do the benchmarks."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from netshrink.config import FinetuneSettings, MeasureSettings, TaskConfig
from netshrink.devices import trial_device
from netshrink.node_lock import compute_slot
from netshrink.stats import interval_metrics
from netshrink.tasks import build_model, example_inputs, load_data
from netshrink.techniques import EarlyExitNet, Pipeline, compress, load_artifact, save_artifact
from netshrink.techniques.base import cross_entropy
from netshrink.training import accuracy, train

from .measure import measure_relative_latency, onnx_evaluate, throughput
from .onnx_export import deployment_config, export_artifact, export_onnx
from .stopping import Checkpoint, FineTuneMonitor, StopRule

ARTIFACT_FILE = "compressed.safetensors"
ONNX_FILE = "model.onnx"
RECIPE_FILE = "recipe.json"  # the pipeline as applied
NOTES_FILE = "notes.txt"  # what the techniques left out and why (``Compressed.notes``)
STOPPED = "stopped_early"  # result key (1.0) of a recipe that early stopping ended, measured as it stood


@dataclass(frozen=True, kw_only=True)
class RecipeSetup:
    """What evaluating a recipe needs besides the recipe: the task, the baseline and how to fine-tune and measure."""

    task: TaskConfig
    finetune: FinetuneSettings
    measure: MeasureSettings
    seed: int
    cpus: float
    search_path: str
    baseline_weights: bytes  # the baseline artifact file, so remote nodes need no shared disk
    baseline_metrics: dict[str, float]
    gpus: float = 0.0  # resources.gpu: fine-tuning runs on CUDA only when the trial reserved a GPU
    sensitivity: dict | None = None  # the baseline's per-layer sensitivity, for allocation: sensitivity
    stop_rule: StopRule | None = None  # early stopping of hopeless recipes; None: every one fine-tunes to the end
    measure_throughput: bool = False  # also time batches of measure.batch_size (the throughput objective)


def evaluate_recipe(
    setup: RecipeSetup, pipeline: Pipeline, workdir: Path, device: torch.device | None = None, report: Callable[[Checkpoint], None] | None = None
) -> dict[str, float]:
    """Compress, fine-tune and measure; returns the trial's metrics. Plain function: no Ray, no MLflow.

    Only fine-tuning uses the trial's GPU; ``train`` hands the model back on the CPU, so the
    artifact, the ONNX export and every measurement are taken on the CPU, as they are deployed.
    Fine-tuning takes validation accuracy at checkpoints and hands each to ``report``; when
    ``setup.stop_rule`` stops the trial, the rest of its fine-tuning is skipped and the model
    is measured as it stands, with ``stopped_early`` and the checkpoint in the metrics.
    """
    torch.set_num_threads(max(1, int(setup.cpus)))
    task = setup.task
    data = load_data(task.dataset, task.dataset_args, setup.search_path)
    fresh = partial(build_model, task.model, task.model_args, data, setup.search_path)
    baseline_file = workdir / "baseline.safetensors"
    baseline_file.write_bytes(setup.baseline_weights)
    try:
        baseline = load_artifact(baseline_file, fresh()).model
    finally:
        baseline_file.unlink()  # a copy per trial would add up to megabytes per trial
    example = example_inputs(data)
    device = device or trial_device(setup.gpus)
    settings = setup.finetune
    monitor = FineTuneMonitor(
        rounds=pipeline.fine_tune_rounds(), epochs=settings.epochs, evaluate=lambda model: accuracy(model, data.val, device=device),
        rule=setup.stop_rule, report=report,
    )

    def fine_tune(model: torch.nn.Module, loss_fn) -> None:
        if monitor.skip or monitor.before_fine_tuning(model):
            return  # stopped: the rest of the fine-tuning is not worth its time
        train(
            model, data.train, epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, seed=setup.seed, device=device,
            loss_fn=loss_fn or cross_entropy, checkpoint=monitor, checkpoints_at=monitor.checkpoints_at,
        )
        monitor.round_done()

    started = time.perf_counter()
    calibration = calibration_samples(data)
    compressed = compress(
        baseline, pipeline, example, fine_tune=fine_tune, seed=setup.seed, sensitivity=setup.sensitivity, calibration_inputs=calibration
    )
    seconds_training = time.perf_counter() - started  # the techniques and their fine-tuning

    artifact = workdir / ARTIFACT_FILE
    reference = workdir / "baseline.onnx"
    with compute_slot():  # heavy enough to disturb a neighbour's latency measurement (not nested: no slot inside)
        size_bytes = save_artifact(artifact, compressed.model, compressed.encodings, compressed.pipeline.recipe())
        loaded = load_artifact(artifact, fresh())
        onnx_bytes = export_artifact(loaded, example, workdir / ONNX_FILE, calibration)  # as `netshrink export` will write it
        export_onnx(baseline, example, reference, {})
    restored = loaded.model
    # the recipe as applied: the layers, ranks and cut points the techniques chose from the model written out
    (workdir / RECIPE_FILE).write_text(json.dumps(compressed.pipeline.model_dump(mode="json"), indent=2))
    if compressed.notes:
        (workdir / NOTES_FILE).write_text("\n".join(compressed.notes))
    started = time.perf_counter()
    inputs = validation_inputs(data.val)
    extra: dict[str, float] = {}
    try:
        # timed on the validation inputs: a model with early exits is timed over all of them, with its exit logic;
        # in the session options the exported file records for its deployment
        timed = measure_relative_latency(workdir / ONNX_FILE, reference, inputs, setup.measure)
        if deployment_config(workdir / ONNX_FILE):  # weight-only integer: what dequantizing on every call would cost
            per_call = measure_relative_latency(workdir / ONNX_FILE, reference, inputs, setup.measure, config={})
            extra["latency_dequant_per_call_ms"] = per_call.ratio * setup.baseline_metrics["latency_ms"]
        if setup.measure_throughput:
            batched = measure_relative_latency(workdir / ONNX_FILE, reference, inputs, setup.measure, batch=setup.measure.batch_size)
            extra["throughput"] = setup.baseline_metrics["throughput"] / batched.ratio
            extra["throughput_raw"] = throughput(batched.candidate.ms, setup.measure.batch_size)
    finally:
        reference.unlink()
    seconds_latency = time.perf_counter() - started
    started = time.perf_counter()
    exported = onnx_evaluate(workdir / ONNX_FILE, data.val)  # the exported model, checked on the same split
    scores = {
        "accuracy": accuracy(restored, data.val),  # with early exits: each sample answered by the exit it leaves at
        "test_accuracy": accuracy(restored, data.test),
        "onnx_accuracy": exported.accuracy,
    }
    seconds_evaluation = time.perf_counter() - started
    base = setup.baseline_metrics
    metrics = {
        **scores,
        # 95% Wilson intervals: on a few hundred samples, an accuracy is an estimate (netshrink.stats)
        **interval_metrics("accuracy", scores["accuracy"], len(data.val)),
        **interval_metrics("test_accuracy", scores["test_accuracy"], len(data.test)),
        "size_bytes": float(size_bytes),
        # drift-corrected: the ratio to the baseline, timed in alternation, times the baseline's latency
        "latency_ms": timed.ratio * base["latency_ms"],
        "latency_raw_ms": timed.candidate.ms,  # this trial's own figure, under whatever the machine did meanwhile
        "latency_reference_raw_ms": timed.reference.ms,
        "latency_p90_raw_ms": timed.candidate.p90_ms,
        **extra,
        "onnx_bytes": float(onnx_bytes),
        "parameters": float(sum(p.numel() for p in restored.parameters())),
        "nonzero_parameters": float(sum(int((p != 0).sum()) for p in restored.parameters())),
        # where the trial's time went (wall seconds in this worker); run_trial adds seconds_trial
        "seconds_training": seconds_training,
        "seconds_latency": seconds_latency,
        "seconds_evaluation": seconds_evaluation,
    }
    if isinstance(restored, EarlyExitNet):  # share of the validation samples that left at each exit (the last: none)
        total = sum(exported.exit_counts.values())
        for index in range(len(restored.heads) + 1):
            metrics[f"exit_share_{index}"] = exported.exit_counts.get(index, 0) / total
    if monitor.stopped is not None:
        metrics.update({STOPPED: 1.0, "stopped_at_fraction": monitor.stopped.fraction, "stopped_accuracy": monitor.stopped.accuracy})
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"non-finite metrics: {bad}")
    metrics["size_ratio"] = base["size_bytes"] / metrics["size_bytes"]
    metrics["speedup"] = 1.0 / timed.ratio
    metrics["accuracy_delta"] = metrics["accuracy"] - base["accuracy"]
    return metrics


CALIBRATION_SAMPLES = 256  # training samples that calibrate static int8's activation ranges (ONNX Runtime's examples take a few hundred)


def calibration_samples(data) -> torch.Tensor:
    """The first ``CALIBRATION_SAMPLES`` training samples: the same for the trial's fine-tuning and for any later export."""
    count = min(len(data.train), CALIBRATION_SAMPLES)
    return torch.stack([torch.as_tensor(data.train[index][0], dtype=torch.float32) for index in range(count)])


def validation_inputs(dataset) -> np.ndarray:
    return np.stack([np.asarray(dataset[index][0], dtype=np.float32) for index in range(len(dataset))])
