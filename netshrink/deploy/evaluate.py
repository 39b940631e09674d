"""Evaluating a recipe end to end: compress the baseline, fine-tune, write the artifact, reload it, export it
to ONNX and measure it. What a trial does, without Ray or MLflow: trials call it, and so do the benchmarks."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from netshrink.config import FinetuneSettings, MeasureSettings, TaskConfig
from netshrink.devices import trial_device
from netshrink.node_lock import compute_slot
from netshrink.metrics import interval_metrics
from netshrink.tasks.task import Task, load_task
from netshrink.techniques import Compressed, Pipeline, compress, has_exits, load_artifact, save_artifact
from netshrink.techniques.slimmable import SlimmableNet, attached, find_slimmable, sliced, width_name
from netshrink.training import predict, train

from .measure import measure_relative_latency, onnx_evaluate, throughput
from .onnx_export import deployment_config, export_artifact, export_onnx
from .slimmable_export import width_path
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
    # multi-fidelity: the epochs of the last fine-tuning round at which the trial is measured and handed to
    # ``at_rung``, in order, the last one finetune.epochs; every round before the last fine-tunes the first
    # rung's epochs. Empty: one measurement, after finetune.epochs in every round
    rungs: tuple[int, ...] = ()


class StoppedAtRung(Exception):
    """Raised through fine-tuning when ``at_rung`` says a trial goes no further: it carries the rung's metrics."""

    def __init__(self, metrics: dict[str, float]) -> None:
        super().__init__("stopped at a rung")
        self.metrics = metrics


RUNG_METRIC = "rung_epochs"  # epochs of the last fine-tuning round the metrics were measured after
FINE_TUNING_METRIC = "seconds_fine_tuning"  # wall seconds inside fine-tuning, rung measurements taken out


class FineTuneClock:
    """Seconds spent fine-tuning, with the measurements taken at rungs (inside fine-tuning) left out: the pace a
    search plans longer fine-tuning at. ``seconds_training`` is no such pace: it also holds the compression and the
    earlier rungs' measurements, and on LeNet-5 it made a refined point look three times as long as it was."""

    def __init__(self) -> None:
        self.total = 0.0
        self._since: float | None = None

    @contextmanager
    def running(self):
        self._since = time.perf_counter()
        try:
            yield
        finally:
            self.total += time.perf_counter() - self._since
            self._since = None

    @contextmanager
    def paused(self):
        since = self._since
        if since is not None:
            self.total += time.perf_counter() - since
            self._since = None
        try:
            yield
        finally:
            if since is not None:
                self._since = time.perf_counter()

    def seconds(self) -> float:
        return self.total + (time.perf_counter() - self._since if self._since is not None else 0.0)


def evaluate_recipe(
    setup: RecipeSetup, pipeline: Pipeline, workdir: Path, device: torch.device | None = None, report: Callable[[Checkpoint], None] | None = None,
    progress: Callable[[str], None] | None = None, at_rung: Callable[[dict[str, float]], bool] | None = None,
) -> dict[str, float]:
    """Compress, fine-tune and measure; returns the trial's metrics. Plain function: no Ray, no MLflow.

    Only fine-tuning uses the trial's GPU; ``train`` hands the model back on the CPU, so the
    artifact, the ONNX export and every measurement are taken on the CPU, as they are deployed.
    Fine-tuning takes validation accuracy at checkpoints and hands each to ``report``; when
    ``setup.stop_rule`` stops the trial, the rest of its fine-tuning is skipped and the model
    is measured as it stands, with ``stopped_early`` and the checkpoint in the metrics. ``progress`` hears a line of
    where a long fine-tuning stands (the search shows the running trials' last lines).

    With ``setup.rungs`` (multi-fidelity), the model is measured in full at each rung but the last, as if its
    fine-tuning ended there (on a copy: ``compress``'s ``snapshot``), and ``at_rung`` gets the metrics: True goes on
    training from where it stands, False ends the trial with them. The rung's latency is the first rung's: the
    graph is the same at every rung, only its weights differ (``latency_rung_epochs`` says which rung timed it;
    a model with early exits is timed again, its exits depending on the weights).
    """
    torch.set_num_threads(max(1, int(setup.cpus)))
    task = load_task(setup.task, setup.search_path, num_workers=setup.finetune.num_workers)
    data, metric = task.data, task.metric
    baseline_file = workdir / "baseline.safetensors"
    baseline_file.write_bytes(setup.baseline_weights)
    try:
        baseline = load_artifact(baseline_file, task.build_model()).model
    finally:
        baseline_file.unlink()  # a copy per trial would add up to megabytes per trial
    example = task.example()
    device = device or trial_device(setup.gpus)
    settings = setup.finetune
    rungs = [epochs for epochs in setup.rungs if 0 < epochs < settings.epochs]
    monitor = FineTuneMonitor(
        rounds=pipeline.fine_tune_rounds(), epochs=rungs[0] if rungs else settings.epochs, last_epochs=settings.epochs,
        evaluate=lambda model: score(task, model, data.val, device), rule=setup.stop_rule, report=report,
    )
    started = time.perf_counter()
    inputs = (example, task.calibration(), task.dynamic_axes())  # what the exports need, the same at every rung
    first_latency: dict[str, float] = {}  # the latency figures of the trial's first measurement
    clock = FineTuneClock()

    def fine_tune(model: torch.nn.Module, loss_fn, checkpoint=None) -> None:
        if monitor.skip or monitor.before_fine_tuning(model):
            return  # stopped: the rest of the fine-tuning is not worth its time
        with clock.running():
            train(
                model, data.train, epochs=monitor.round_epochs(), lr=settings.lr, batch_size=settings.batch_size, seed=setup.seed, device=device,
                loss_fn=loss_fn, checkpoint=checkpoint or monitor, checkpoints_at=monitor.checkpoints_at, batches=task.batches,
                settings=settings, on_epoch=epoch_line(f"fine-tuning round {monitor.round + 1}", metric.name, monitor, progress),
                on_step=step_line(f"fine-tuning round {monitor.round + 1}/{monitor.rounds}", progress),
            )
        monitor.round_done()

    def final_fine_tune(model: torch.nn.Module, loss_fn, snapshot) -> None:
        def checkpoint(current: torch.nn.Module, epochs_done: float) -> bool:
            if monitor(current, epochs_done):
                return True
            if epochs_done in rungs:  # a rung: the model measured as if its fine-tuning ended here
                with clock.paused():  # measuring and reporting a rung is no fine-tuning
                    metrics = measured(snapshot(current), epochs_done)
                    if at_rung is None or not at_rung(metrics):
                        raise StoppedAtRung(metrics)
            return False

        fine_tune(model, loss_fn, checkpoint)

    def measured(compressed: Compressed, epochs: float) -> dict[str, float]:
        fine_tuning = clock.seconds()
        with clock.paused():
            metrics, latency = measure_compressed(
                setup, task, baseline, compressed, workdir, inputs, seconds_training=time.perf_counter() - started, epochs=epochs,
                latency=first_latency or None,
            )
        metrics[FINE_TUNING_METRIC] = fine_tuning
        first_latency.update(latency)
        metrics[RUNG_METRIC] = float(epochs)
        metrics["epochs_trained"] = monitor.curve[-1].epochs if monitor.curve else 0.0  # fine-tuning epochs over every round
        metrics["fine_tune_rounds"] = float(monitor.rounds)  # its fine-tunings (iterative pruning's between steps, and the last)
        metrics["rung_of"] = float(len(rungs) + 1)  # how many rungs a trial that goes all the way is measured at
        metrics["rung_index"] = float(rungs.index(epochs) + 1 if epochs in rungs else len(rungs) + 1)  # which of them this is (1: the first)
        return metrics

    try:
        compressed = compress(
            baseline, pipeline, example, fine_tune=fine_tune, seed=setup.seed, sensitivity=setup.sensitivity, calibration_inputs=inputs[1],
            loss_fn=task.loss, final_fine_tune=final_fine_tune if rungs else None,
        )
    except StoppedAtRung as stop:
        return stop.metrics
    stopped = monitor.stopped
    metrics = measured(compressed, settings.epochs if stopped is None else max(0.0, stopped.epochs - (monitor.rounds - 1) * monitor.epochs))
    if stopped is not None:
        metrics.update({STOPPED: 1.0, "stopped_at_fraction": stopped.fraction, f"stopped_{metric.name}": stopped.accuracy})
    return metrics


def measure_compressed(
    setup: RecipeSetup, task: Task, baseline: torch.nn.Module, compressed: Compressed, workdir: Path, inputs: tuple, *,
    seconds_training: float, epochs: float, latency: dict[str, float] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Write ``compressed`` as the artifact, reload it, export it to ONNX and measure it: the metrics a trial logs, and
    the latency figures among them. ``inputs``: the example, the calibration inputs and the dynamic axes the exports take.

    ``latency``: the figures of an earlier measurement of the same graph (an earlier rung), kept instead of timing
    again (a model with early exits is timed every time: its exits depend on the weights).
    """
    data, metric = task.data, task.metric
    example, calibration, axes = inputs
    artifact = workdir / ARTIFACT_FILE
    reference = workdir / "baseline.onnx"
    with compute_slot():  # heavy enough to disturb a neighbour's latency measurement (not nested: no slot inside)
        size_bytes = save_artifact(artifact, compressed.model, compressed.encodings, compressed.pipeline.recipe())
        loaded = load_artifact(artifact, task.build_model())
        onnx_bytes = export_artifact(loaded, example, workdir / ONNX_FILE, calibration, axes)  # as `netshrink export` will write it
        restored = loaded.model
        exits = has_exits(restored)
        timing = latency is None or exits
        if timing:
            export_onnx(baseline, example, reference, {}, axes)
    # the recipe as applied: the layers, ranks and cut points the techniques chose from the model written out
    (workdir / RECIPE_FILE).write_text(json.dumps(compressed.pipeline.model_dump(mode="json"), indent=2))
    if compressed.notes:
        (workdir / NOTES_FILE).write_text("\n".join(compressed.notes))
    slimmable = find_slimmable(restored)
    narrower = list(enumerate(slimmable.widths[:-1])) if slimmable is not None else []  # the widest is model.onnx itself
    started = time.perf_counter()
    if timing:
        try:
            latency = {**time_latency(setup, task, workdir / ONNX_FILE, reference), "latency_rung_epochs": float(epochs)}
            for _, width in narrower:  # each width as deployed: its own graph over the shared weights
                figures = time_latency(setup, task, width_path(workdir / ONNX_FILE, width), reference)
                latency.update({f"{width_prefix(width)}{name}": value for name, value in figures.items()})
        finally:
            reference.unlink()
    seconds_latency = time.perf_counter() - started
    started = time.perf_counter()
    exported = onnx_evaluate(workdir / ONNX_FILE, data.val, task.batches, metric)  # the exported model, checked on the same split
    # with early exits: each sample answered by the exit it leaves at
    scores = split_scores(task, restored)
    scores[f"onnx_{metric.name}"] = exported.value
    if slimmable is not None:
        scores.update(width_scores(task, slimmable, example, workdir / ONNX_FILE, scores, latency))
    seconds_evaluation = time.perf_counter() - started
    base = setup.baseline_metrics
    metrics = {
        **scores,
        "size_bytes": float(size_bytes),
        **latency,
        "onnx_bytes": float(onnx_bytes),
        "parameters": float(sum(p.numel() for p in restored.parameters())),
        "nonzero_parameters": float(sum(int((p != 0).sum()) for p in restored.parameters())),
        # where the trial's time went (wall seconds in this worker); run_trial adds seconds_trial
        "seconds_training": seconds_training,
        "seconds_latency": seconds_latency,
        "seconds_evaluation": seconds_evaluation,
    }
    if exits:  # share of the validation samples that left at each exit (the last: none)
        total = sum(exported.exit_counts.values())
        for index in range(len(restored.heads) + 1):
            metrics[f"exit_share_{index}"] = exported.exit_counts.get(index, 0) / total
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"non-finite metrics: {bad}")
    metrics["size_ratio"] = base["size_bytes"] / metrics["size_bytes"]
    metrics["speedup"] = base["latency_ms"] / metrics["latency_ms"]  # the inverse of the timed ratio to the baseline
    metrics[f"{metric.name}_delta"] = metrics[metric.name] - base[metric.name]
    return metrics, latency


def width_prefix(width: float) -> str:
    """``width_0.5/``: the prefix of a slimmable width's metrics (``width_0.5/accuracy``, ``width_0.5/latency_ms``)."""
    return f"width_{width_name(width)}/"


def width_scores(task: Task, net: SlimmableNet, example, onnx_file: Path, widest: dict[str, float], latency: dict[str, float]) -> dict[str, float]:
    """Each width of a slimmable network measured as it is deployed: the metric of its sliced network on the validation
    and test splits (with their intervals), and of its own ONNX graph on the validation split, under ``width_<w>/``; the
    widest's are the trial's own figures (``model.onnx`` is the widest), repeated under its prefix with its latency."""
    name = task.metric.name
    net = attached(net, example)
    scores: dict[str, float] = {"widths": float(len(net.widths))}
    for index, width in enumerate(net.widths):
        prefix = width_prefix(width)
        if index == len(net.widths) - 1:
            figures = {key: value for key, value in widest.items()}
            figures.update({key: value for key, value in latency.items() if not key.startswith("width_")})
        else:
            figures = split_scores(task, sliced(net, index, example))
            figures[f"onnx_{name}"] = onnx_evaluate(width_path(onnx_file, width), task.data.val, task.batches, task.metric).value
        scores.update({f"{prefix}{key}": value for key, value in figures.items() if key != "latency_rung_epochs"})
    return scores


def time_latency(setup: RecipeSetup, task: Task, model_file: Path, reference: Path) -> dict[str, float]:
    """The latency figures of ``model_file``, timed in alternation with the baseline's ``reference``, on the validation inputs (a
    model with early exits over all of them, with its exit logic), in the session options the exported file records for its
    deployment."""
    data, base = task.data, setup.baseline_metrics
    feeds = task.batches.feeds(data.val)
    timed = measure_relative_latency(model_file, reference, feeds, setup.measure)
    figures = {
        # drift-corrected: the ratio to the baseline, timed in alternation, times the baseline's latency
        "latency_ms": timed.ratio * base["latency_ms"],
        "latency_raw_ms": timed.candidate.ms,  # this trial's own figure, under whatever the machine did meanwhile
        "latency_reference_raw_ms": timed.reference.ms,
        "latency_p90_raw_ms": timed.candidate.p90_ms,
    }
    if deployment_config(model_file):  # weight-only integer: what dequantizing on every call would cost
        per_call = measure_relative_latency(model_file, reference, feeds, setup.measure, config={})
        figures["latency_dequant_per_call_ms"] = per_call.ratio * base["latency_ms"]
    if setup.measure_throughput:
        batch = setup.measure.batch_size
        batched = measure_relative_latency(model_file, reference, task.batches.feeds(data.val, batch, limit=batch), setup.measure, batch=batch)
        figures["throughput"] = base["throughput"] / batched.ratio
        figures["throughput_raw"] = throughput(batched.candidate.ms, batch)
    return figures


def score(task: Task, model: torch.nn.Module, dataset, device: torch.device | str = "cpu") -> float:
    """The task's metric of ``model`` on ``dataset``."""
    predictions = predict(model, dataset, device=device, batches=task.batches)
    return task.metric(predictions.logits, predictions.targets)


def split_scores(task: Task, model: torch.nn.Module) -> dict[str, float]:
    """The metric on the validation and test splits, each with its 95% interval (``netshrink.metrics``):
    ``{m}``, ``test_{m}``, ``{m}_ci_low``, ... for the metric's name ``m``."""
    name, scores = task.metric.name, {}
    for prefix, dataset in ((name, task.data.val), (f"test_{name}", task.data.test)):
        predictions = predict(model, dataset, batches=task.batches)
        scores[prefix] = task.metric(predictions.logits, predictions.targets)
        scores.update(interval_metrics(task.metric, prefix, predictions.logits, predictions.targets, scores[prefix]))
    return scores


def epoch_line(what: str, metric_name: str, monitor: FineTuneMonitor | None = None, print_fn: Callable[[str], None] | None = None):
    """``on_epoch`` for ``train``: a progress line per epoch, with the loss, the last validation metric and an ETA,
    when an epoch takes ``PROGRESS_SECONDS`` or more (a trial of the built-in task stays quiet: its epochs take a second)."""

    def report(done: int, total: int, loss: float, seconds: float) -> None:
        if seconds / done < PROGRESS_SECONDS:
            return
        last = monitor.last_value() if monitor is not None else None
        value = f", validation {metric_name} {last:.4f}" if last is not None else ""
        eta = seconds / done * (total - done)
        line = f"{what}: epoch {done}/{total}, loss {loss:.4f}{value}, {seconds:.0f} s, about {eta:.0f} s to go"
        print_fn(line) if print_fn is not None else print(line, flush=True)

    return report


PROGRESS_SECONDS = 5.0
STEP_LINE_EVERY = 30.0  # seconds between two progress lines within an epoch


def step_line(what: str, print_fn: Callable[[str], None] | None = None):
    """``on_step`` for ``train``: within long epochs, a line at most every ``STEP_LINE_EVERY`` s with the step, the time
    so far and the time to go (a ResNet-18 epoch on a CPU takes minutes; a trial of the built-in task says nothing)."""
    last = [0.0]

    def report(epoch: int, epochs: int, step: int, steps: int, seconds: float) -> None:
        if seconds - last[0] < STEP_LINE_EVERY:
            return
        last[0] = seconds
        done = ((epoch - 1) * steps + step) / (epochs * steps)
        line = f"{what}: epoch {epoch}/{epochs}, step {step}/{steps} ({done:.0%}), {seconds:.0f} s, about {seconds / done - seconds:.0f} s to go"
        print_fn(line) if print_fn is not None else print(line, flush=True)

    return report
