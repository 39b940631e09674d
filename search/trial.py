"""One trial: replay a sampled recipe on the baseline, fine-tune, measure, report, log.

Everything measured comes from the artifact the trial wrote: the model is
reloaded from that file before accuracy and latency are taken, so the numbers
describe exactly what export ships.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

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

from .constraints import Constraints
from netshrink.config import MeasureSettings
from netshrink.deploy.measure import measure_relative_latency, onnx_evaluate
from netshrink.deploy.onnx_export import export_artifact, export_onnx
from netshrink.deploy.stopping import Checkpoint, FineTuneMonitor, StopRule
from .tracking import (
    DEVICE_TAG, ERROR_TAG, FEASIBLE_TAG, NODE_TAG, OPTUNA_TRIAL_TAG, RECIPE_FILE, RECIPE_TAG, REFINED_FROM_TAG, STOP_REASON_TAG, STOPPED_AT_TAG,
    STOPPED_TAG, SUMMARY_TAG, TUNE_TRIAL_TAG, FINETUNE_METRIC, Tracker, flatten,
)

ARTIFACT_FILE = "compressed.safetensors"
NOTES_FILE = "notes.txt"  # what the techniques left out and why (``Compressed.notes``), tagged ``notes`` on the run
NOTES_TAG = "notes"
ONNX_FILE = "model.onnx"
REFINE_OF = "refine_of"  # key of a refinement's config: the run id of the trial it refines


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares; shipped to the workers once through Ray's object store."""

    task: TaskConfig
    finetune: FinetuneSettings
    measure: MeasureSettings
    seed: int
    cpus: float
    search_path: str
    baseline_weights: bytes  # the baseline artifact file, so remote nodes need no shared disk
    baseline_metrics: dict[str, float]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    gpus: float = 0.0  # resources.gpu: fine-tuning runs on CUDA only when the trial reserved a GPU
    sensitivity: dict | None = None  # the baseline's per-layer sensitivity, for allocation: sensitivity
    constraints: Constraints | None = None  # what a shippable model reaches: tags the run ``feasible``
    stop_rule: StopRule | None = None  # early stopping of hopeless trials; None: every trial fine-tunes to the end


STOPPED = "stopped_early"  # result key (1.0) of a trial that early stopping ended, measured as it stood


def evaluate_recipe(
    setup: TrialSetup, pipeline: Pipeline, workdir: Path, device: torch.device | None = None, report: Callable[[Checkpoint], None] | None = None
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
    compressed = compress(baseline, pipeline, example, fine_tune=fine_tune, seed=setup.seed, sensitivity=setup.sensitivity)
    seconds_training = time.perf_counter() - started  # the techniques and their fine-tuning

    artifact = workdir / ARTIFACT_FILE
    reference = workdir / "baseline.onnx"
    with compute_slot():  # heavy enough to disturb a neighbour's latency measurement (not nested: no slot inside)
        size_bytes = save_artifact(artifact, compressed.model, compressed.encodings, compressed.pipeline.recipe())
        loaded = load_artifact(artifact, fresh())
        onnx_bytes = export_artifact(loaded, example, workdir / ONNX_FILE)  # as `netshrink export` will write it
        export_onnx(baseline, example, reference, {})
    restored = loaded.model
    # the recipe as applied: the layers, ranks and cut points the techniques chose from the model written out
    (workdir / RECIPE_FILE).write_text(json.dumps(compressed.pipeline.model_dump(mode="json"), indent=2))
    if compressed.notes:
        (workdir / NOTES_FILE).write_text("\n".join(compressed.notes))
    started = time.perf_counter()
    try:
        # timed on the validation inputs: a model with early exits is timed over all of them, with its exit logic
        timed = measure_relative_latency(workdir / ONNX_FILE, reference, validation_inputs(data.val), setup.measure)
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


def validation_inputs(dataset) -> np.ndarray:
    return np.stack([np.asarray(dataset[index][0], dtype=np.float32) for index in range(len(dataset))])


def refine_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune trainable of a refinement: ``config["point"]`` is a trial's recipe with ``run_name`` and ``refine_of``."""
    run_trial(config["point"], setup)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune function trainable: one child MLflow run, one report with all objectives.

    Tune runs a failed trial again (``search.max_failures``) under the same trial id: the
    retry carries on in the child run of the attempt before it instead of adding a second
    one, and if that attempt had finished and only its report was lost with its worker,
    the logged metrics are reported as they are.
    """
    import ray
    from ray import tune

    started = time.perf_counter()
    pipeline = Pipeline.from_recipe(config["recipe"])
    number = int(config.get("optuna_trial", -1))
    refined_from = config.get(REFINE_OF)
    # Ray hands define-by-run values back nested ({"pruning": {"ratio": ...}}); log them under Optuna's names.
    params = flatten({key: value for key, value in config.items() if key not in {"recipe", "optuna_trial", REFINE_OF, "run_name"}}, sep="/")
    if refined_from:
        params["refine/epochs"] = setup.finetune.epochs
    tracker = Tracker(setup.tracking_uri)
    tune_trial_id = tune.get_context().get_trial_id() or ""
    earlier = tracker.trial_attempt(setup.experiment_id, setup.parent_run_id, tune_trial_id) if tune_trial_id else None
    if earlier is not None and earlier.info.status == "FINISHED":
        tune.report({**earlier.data.metrics, "mlflow_run_id": earlier.info.run_id})
        return
    if earlier is not None:
        run_id = earlier.info.run_id
        tracker.reopen(run_id)
    else:
        # a refined run is no Optuna trial: it names the trial it refines instead
        origin = {REFINED_FROM_TAG: refined_from} if refined_from else {OPTUNA_TRIAL_TAG: str(number)}
        run_id = tracker.start_trial(
            setup.experiment_id,
            setup.parent_run_id,
            run_name=config.get("run_name") or f"trial-{number:03d}",
            tags={**origin, TUNE_TRIAL_TAG: tune_trial_id, RECIPE_TAG: pipeline.recipe(), SUMMARY_TAG: pipeline.describe()},
        )
    try:
        # where this attempt ran: the Ray node, and the device fine-tuning used
        device = trial_device(setup.gpus)
        tracker.log(run_id, params=params, tags={NODE_TAG: ray.get_runtime_context().get_node_id(), DEVICE_TAG: str(device)})
        tracker.log_json(run_id, pipeline.model_dump(mode="json"), RECIPE_FILE)  # as sampled, until the trial writes what it applied
        trial_dir = tune.get_context().get_trial_dir()
        workdir = Path(trial_dir) if trial_dir else Path(tempfile.mkdtemp(prefix="netshrink-trial-"))
        workdir.mkdir(parents=True, exist_ok=True)
        metrics = evaluate_recipe(setup, pipeline, workdir, device, report=partial(log_checkpoint, tracker, run_id))
        tracker.log_file(run_id, workdir / ARTIFACT_FILE)
        tracker.log_file(run_id, workdir / RECIPE_FILE)  # replaces the sampled recipe logged above
        metrics["seconds_trial"] = time.perf_counter() - started  # all of this function but the last metric upload
        tags = {}
        if setup.constraints is not None:
            tags[FEASIBLE_TAG] = str(setup.constraints.feasible(metrics) and STOPPED not in metrics).lower()
        if STOPPED in metrics:
            tags.update({STOPPED_TAG: "true", STOPPED_AT_TAG: f"{metrics['stopped_at_fraction']:.3f}", STOP_REASON_TAG: stop_reason(metrics, setup)})
        notes = (workdir / NOTES_FILE).read_text() if (workdir / NOTES_FILE).is_file() else ""
        if notes:
            tags[NOTES_TAG] = notes[:5000]  # layers a technique left out, and why
        tracker.log(run_id, metrics=metrics, tags=tags)
    except BaseException as error:
        tracker.log(run_id, tags={ERROR_TAG: f"{type(error).__name__}: {error}"[:5000]})
        tracker.finish(run_id, failed=True)
        raise
    if STOPPED in metrics:
        tracker.stopped(run_id)
    else:
        tracker.finish(run_id)
    tune.report({**metrics, "mlflow_run_id": run_id})


def log_checkpoint(tracker: Tracker, run_id: str, point: Checkpoint) -> None:
    """Validation accuracy during fine-tuning, as an MLflow metric history (step: 100 x epochs done)."""
    tracker.client.log_metric(run_id, FINETUNE_METRIC, point.accuracy, step=round(100 * point.epochs))


def stop_reason(metrics: dict[str, float], setup: TrialSetup) -> str:
    checkpoint = Checkpoint(fraction=metrics["stopped_at_fraction"], epochs=0.0, accuracy=metrics["stopped_accuracy"])
    return (setup.stop_rule.reason(checkpoint) if setup.stop_rule else None) or "stopped early"
