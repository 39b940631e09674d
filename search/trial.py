"""One trial: replay a sampled recipe on the baseline (``netshrink.deploy.evaluate``), report it to Ray Tune, log it to MLflow.

Everything measured comes from the artifact the trial wrote: the model is
reloaded from that file before accuracy and latency are taken, so the numbers
describe exactly what export ships.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from netshrink.deploy.evaluate import ARTIFACT_FILE, NOTES_FILE, ONNX_FILE, RUNG_METRIC, STOPPED, RecipeSetup, evaluate_recipe
from netshrink.deploy.stopping import Checkpoint, encode_curve
from netshrink.devices import trial_device
from netshrink.errors import DiskFull, TrackingUnavailable, disk_full
from netshrink.integrity import file_sha256
from netshrink.memory import PeakMemory
from netshrink.techniques import Pipeline

from .constraints import Constraints
from .front import operating_point
from .tracking import (
    ARTIFACT_SHA_TAG, ONNX_SHA_TAG, DEVICE_TAG, ERROR_TAG, FEASIBLE_TAG, NODE_TAG, NOTES_TAG, OPTUNA_TRIAL_TAG, RECIPE_FILE, RECIPE_TAG, REFINED_FROM_TAG,
    PROGRESS_TAG, STOP_REASON_TAG, STOPPED_AT_TAG, STOPPED_TAG, SUMMARY_TAG, TUNE_TRIAL_TAG, DEFAULT_TIMEOUT_S, Tracker, flatten,
)

__all__ = ["ARTIFACT_FILE", "ONNX_FILE", "REFINE_OF", "TrialSetup", "evaluate_recipe", "refine_trial", "run_trial"]

REFINE_OF = "refine_of"  # key of a refinement's config: the run id of the trial it refines


@dataclass(frozen=True, kw_only=True)
class TrialSetup(RecipeSetup):
    """What every trial of a search shares; shipped to the workers once through Ray's object store."""

    tracking_uri: str
    experiment_id: str
    tracking_timeout_s: float = DEFAULT_TIMEOUT_S  # tracking.timeout_s
    parent_run_id: str
    constraints: Constraints | None = None  # what a shippable model reaches: tags the run ``feasible``


def refine_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune trainable of a refinement: ``config["point"]`` is a trial's recipe with ``run_name`` and ``refine_of``."""
    run_trial(config["point"], setup)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune function trainable: one child MLflow run, one report with all objectives (``_run_trial``).

    A full disk, wherever it strikes, is raised as ``DiskFull``, one line naming it: the driver stops the
    search on it (``progress.py``), since every next trial would fail the same way.
    """
    try:
        _run_trial(config, setup)
    except Exception as error:
        full = disk_full(error)
        if full:
            raise DiskFull(full + full_where(full, setup)) from None
        raise


def full_where(full: str, setup: TrialSetup) -> str:
    """Where the disk that filled is, when ``disk_full``'s line does not name a file: SQLite says only "database
    or disk is full", and the database a trial writes is the MLflow store."""
    if " writing " in full:
        return ""
    if setup.tracking_uri.startswith("sqlite:///"):
        return f" (writing the MLflow store {setup.tracking_uri.removeprefix('sqlite:///')})"
    return " (writing the trial's files on this node)"


def _run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One trial: its child MLflow run, the recipe evaluated, the metrics logged and reported.

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
    params = flatten({key: value for key, value in config.items() if key not in {"recipe", "optuna_trial", REFINE_OF, "run_name", RECOVERY_KEY}}, sep="/")
    if refined_from:
        params["refine/epochs"] = setup.finetune.epochs
    tracker = Tracker(setup.tracking_uri, timeout_s=setup.tracking_timeout_s)
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
        trial_setup = with_recovery(setup, config.get(RECOVERY_KEY))
        if trial_setup.stop_rule is not None:
            tracker.log(run_id, tags={STOP_RULE_TAG: describe_rule(trial_setup.stop_rule)})
        curve: list[Checkpoint] = []

        def checkpoint(point: Checkpoint) -> None:
            curve.append(point)
            log_checkpoint(tracker, run_id, setup.task.metric_name, point)

        def at_rung(metrics: dict[str, float]) -> bool:
            """A rung: the figures and the artifact logged as the run's own (a trial stopped here ends with them), then
            reported; Tune's scheduler answers by letting ``tune.report`` return (go on) or by ending this thread."""
            record(metrics, peak=None)
            tune.report({**as_judged(metrics, setup.constraints), "mlflow_run_id": run_id, CURVE_KEY: encode_curve(curve)})
            return True

        def record(metrics: dict[str, float], peak: PeakMemory | None) -> None:
            if peak is not None:
                metrics[PEAK_RSS_METRIC] = peak.bytes  # the worker's peak resident set during this trial (since the worker started, if noted)
            metrics["seconds_trial"] = time.perf_counter() - started  # all of this function but the last metric upload
            tracker.log_file(run_id, workdir / ARTIFACT_FILE)
            tracker.log_file(run_id, workdir / RECIPE_FILE)  # replaces the sampled recipe logged above
            tags = {ARTIFACT_SHA_TAG: file_sha256(workdir / ARTIFACT_FILE), ONNX_SHA_TAG: file_sha256(workdir / ONNX_FILE)}
            if setup.constraints is not None:
                tags[FEASIBLE_TAG] = str(setup.constraints.feasible(metrics) and STOPPED not in metrics).lower()
            if STOPPED in metrics:
                tags.update({STOPPED_TAG: "true", STOPPED_AT_TAG: f"{metrics['stopped_at_fraction']:.3f}", STOP_REASON_TAG: stop_reason(metrics, trial_setup)})
            notes = (workdir / NOTES_FILE).read_text() if (workdir / NOTES_FILE).is_file() else ""
            if notes:
                tags[NOTES_TAG] = notes[:5000]  # layers a technique left out, and why
            if peak is not None and peak.since_start:
                tags[PEAK_RSS_SCOPE_TAG] = "since the worker process started (the kernel refused a reset of its high-water mark)"
            tracker.log(run_id, metrics=metrics, tags=tags, step=int(metrics.get(RUNG_METRIC, 0)))

        try:
            with PeakMemory() as peak:
                metrics = evaluate_recipe(
                    trial_setup, pipeline, workdir, device, report=checkpoint, progress=partial(log_progress, tracker, run_id), at_rung=at_rung,
                )
        except SystemExit:  # Tune's scheduler stopped the trial at a rung: the rung's figures, logged above, are its result
            tracker.finish(run_id)
            raise
        record(metrics, peak)
    except BaseException as error:
        if isinstance(error, SystemExit):
            raise
        full = disk_full(error)
        if not isinstance(error, TrackingUnavailable):  # recording the failure must not hide it, nor wait for the server again
            try:
                tracker.log(run_id, tags={ERROR_TAG: (full or f"{type(error).__name__}: {error}")[:5000]})
                tracker.client.log_text(run_id, traceback.format_exc(), TRACEBACK_FILE)  # the whole of it; the console shows one line
                tracker.finish(run_id, failed=True)
            except Exception:
                pass
        raise
    if STOPPED in metrics:
        tracker.stopped(run_id)
    else:
        tracker.finish(run_id)
    tune.report({**as_judged(metrics, setup.constraints), "mlflow_run_id": run_id, CURVE_KEY: encode_curve(curve), FINAL_KEY: 1.0})


def as_judged(metrics: dict[str, float], constraints) -> dict[str, float]:
    """The figures the sampler and MO-ASHA judge a trial by: its own, or for a slimmable trial those of its operating
    width (``front.operating_point``: the narrowest that meets the constraints), with ``OPERATING_WIDTH`` saying which.
    MLflow keeps the trial's own figures (the widest width's) and every width's under ``width_<w>/``."""
    point = operating_point(metrics, constraints)
    if point is None:
        return metrics
    width, figures = point
    return {**metrics, **figures, OPERATING_WIDTH: width}


OPERATING_WIDTH = "operating_width"


RECOVERY_KEY = "recovery"  # key of a trial's config: the stop rule's recovery table as the search had calibrated it
CURVE_KEY = "finetune_curve"  # key of a trial's result: its checkpoints so far, for the searcher's calibration
FINAL_KEY = "final"  # key of a trial's last result (1.0): its fine-tuning ended, not a rung
STOP_RULE_TAG = "stop_rule"  # the recovery allowance the trial's early stopping used, in words


def with_recovery(setup: TrialSetup, table) -> TrialSetup:
    """The setup with the stop rule's recovery table the searcher handed this trial (as calibrated so far)."""
    if setup.stop_rule is None or not table:
        return setup
    return replace(setup, stop_rule=replace(setup.stop_rule, recovery=tuple(tuple(row) for row in table)))


def describe_rule(rule) -> str:
    calibrated = [f"{share:g}: +{rise:.2f} ({curves} trials)" for share, rise, curves in rule.recovery if curves]
    prior = [f"{share:g}" for share, _, curves in rule.recovery if not curves]
    parts = [f"recovery allowed by share of fine-tuning done: {', '.join(calibrated)}"] if calibrated else []
    if prior:
        parts.append(f"the conservative prior (+{max(r for _, r, c in rule.recovery if not c):.2f}) at {', '.join(prior)}")
    return "; ".join(parts)[:5000]


PEAK_RSS_METRIC = "peak_rss_bytes"
PEAK_RSS_SCOPE_TAG = "peak_rss_scope"
TRACEBACK_FILE = "traceback.txt"  # a failed trial's whole traceback, an artifact of its run


def log_progress(tracker: Tracker, run_id: str, line: str) -> None:
    """Where a long fine-tuning stands, as the run's ``progress`` tag: the search's console shows it (``progress.RunningTrials``)."""
    try:
        tracker.client.set_tag(run_id, PROGRESS_TAG, line)
    except Exception:  # a progress line is not worth failing a trial over
        pass


def log_checkpoint(tracker: Tracker, run_id: str, metric: str, point: Checkpoint) -> None:
    """The validation metric during fine-tuning, as an MLflow metric history ``finetune_<metric>`` (step: 100 x epochs done)."""
    tracker.client.log_metric(run_id, f"finetune_{metric}", point.accuracy, step=round(100 * point.epochs))


def stop_reason(metrics: dict[str, float], setup: TrialSetup) -> str:
    checkpoint = Checkpoint(fraction=metrics["stopped_at_fraction"], epochs=0.0, accuracy=metrics[f"stopped_{setup.task.metric_name}"])
    return (setup.stop_rule.reason(checkpoint) if setup.stop_rule else None) or "stopped early"
