"""``netshrink search``: baseline, then Ray Tune trials steered by Optuna, then the Pareto front in MLflow.

This module runs a search from end to end; each of its jobs lives in a module of its own:
``preflight`` (the MLflow store and the Ray cluster, checked before anything trains),
``tracking`` (the parent run: ``Tracker.start_search`` writes the search's record),
``tuning`` (Ray Tune and Optuna: the trials and the refinement), ``progress`` (what the
console shows while trials run) and ``summary`` (the front, its tags, plots and table).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import optuna
from pathlib import Path

from rich.console import Console

from netshrink.config import MIN_AUTO_RUNGS, Experiment
from netshrink.deploy.stopping import StopRule
from netshrink.errors import SearchStopped, TrackingUnavailable, UserError, disk_full
from netshrink.node_lock import exclusive_file, lock_files

from .baseline import prepare_baseline
from .constraints import DEFAULT_DROP, Constraints
from .front import TrialPoint, with_interval
from .preflight import connect_tracking, start_ray
from .progress import OPEN_ENDED
from .resume import Progress, find_interrupted_search, rebuild_study, reopen_search, study_exists
from .summary import print_summary, summarise
from .tracking import ABANDONED_TAG, default_tracking_uri
from .trial import TrialSetup
from .searcher import Deadline
from .tuning import quiet_tracebacks, refine_front, run_trials

STATE_DIR = ".netshrink"


@dataclass(frozen=True)
class Overrides:
    """Command-line values that replace the experiment file's."""

    trials: int | None = None
    concurrency: int | None = None
    address: str | None = None
    tracking_uri: str | None = None


@dataclass
class SearchResult:
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    study_name: str
    optuna_storage: str
    front: list[TrialPoint]
    points: list[TrialPoint]
    failed: int
    closest: list[TrialPoint]  # no feasible trial: the nearest ones (``front.closest_to_feasible``), stopped ones included
    baseline: dict[str, float]
    seconds: float


WEAK_MARGIN = 0.02  # a baseline within 2 points of answering the most frequent class learned nothing worth compressing


def check_baseline_learned(experiment: Experiment, baseline: dict[str, float]) -> None:
    """``UserError`` when the baseline's validation metric is within ``WEAK_MARGIN`` of always answering the most
    frequent class (unless ``task.allow_weak_baseline``): compressing a model that learned nothing is a mistake."""
    metric = experiment.metric
    majority = baseline.get(f"majority_{metric}")
    if majority is None or experiment.task.allow_weak_baseline or baseline[metric] > majority + WEAK_MARGIN:
        return
    raise UserError(
        f"task: the baseline's validation {metric} is {baseline[metric]:.4f}, within {100 * WEAK_MARGIN:g} points of the {majority:.4f} that "
        "always answering the most frequent class scores: it learned nothing worth compressing. Train it longer (task.train.epochs), check "
        "task.weights, or set task.allow_weak_baseline: true to search anyway"
    )


def settle(action, console: Console) -> None:
    """Run one bookkeeping write of a failure path (mark a run KILLED or FAILED); if it fails too, say so in one
    line and go on: the error being reported is the one that matters, and this path must not crash. MLflow's own
    logging of the failed write (a page of traceback) is held back by ``quiet_tracebacks``, which ``run_search`` calls first."""
    try:
        action()
    except Exception as error:
        lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith(("(raised as", "(Background", "[SQL", "[parameters"))]
        why = disk_full(error) or (lines[0][:160] if lines else type(error).__name__)
        console.print(f"[yellow]note: could not record the search's state in MLflow ({why})[/yellow]", highlight=False)


def describe_seconds(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 and seconds % 360 == 0 else f"{seconds / 60:g} min"


def optuna_storage_url(tracking_uri: str, state_dir: Path) -> str:
    """Next to the MLflow store when that is a local SQLite file, else in the state folder."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).resolve().parent / 'optuna.db'}"
    return f"sqlite:///{(state_dir / 'optuna.db').resolve()}"


RESUME_LATEST = "latest"  # --resume with no run id


def time_budget(experiment: Experiment, started: float, concurrency: int) -> Deadline | None:
    """The searcher's deadline for a search with a time budget: the search's start plus the budget, keeping for
    refinement ``ceil(refine.count / concurrency)`` rounds of a refined point (``searcher.Deadline``)."""
    seconds = experiment.search.seconds
    if seconds is None:
        return None
    refine = experiment.refine
    rounds = math.ceil(refine.count / concurrency) if refine.epochs > 0 and refine.points in ("knee", "potential") else (1 if refine.epochs > 0 else 0)
    return Deadline(end=started + seconds, refine_rounds=rounds, refine_epochs=refine.epochs, budget=seconds)


def abandon_search(experiment: Experiment, config_path: Path, run_id: str, overrides: Overrides = Overrides(), console: Console | None = None) -> None:
    """``netshrink search --abandon RUN_ID``: mark an unfinished search ended, so that ``--resume`` passes it by."""
    from .resume import abandon_search as abandon

    console = console or Console()
    tracking_uri = overrides.tracking_uri or experiment.tracking_uri or default_tracking_uri(Path.cwd())
    tracker, experiment_id = connect_tracking(tracking_uri, experiment.name, experiment.tracking.timeout_s, log=console.print)
    abandon(tracker, experiment_id, experiment.name, run_id)
    console.print(f"Search {run_id} of {experiment.name!r} is marked ended (KILLED, {ABANDONED_TAG}); --resume passes it by. Its finished trials stay in MLflow.")


def run_search(
    experiment: Experiment, config_path: Path, overrides: Overrides = Overrides(), console: Console | None = None, resume: bool | str | None = None
) -> SearchResult:
    """Run one search end to end, or with ``resume`` finish an interrupted one (see ``resume.py``): ``True`` or
    ``"latest"`` for the latest, else the parent run id of the search to finish.

    Problems with the tracking server, the Ray cluster or the search to resume are
    reported as ``UserError`` before the baseline is trained.
    """
    import ray

    console = console or Console()
    started = time.time()
    quiet_tracebacks()
    metric = experiment.metric
    for note in experiment.notes():
        console.print(f"[yellow]note: {note}[/yellow]")
    if experiment.search.sampler == "botorch":
        from .tuning import botorch_sampler

        botorch_sampler()  # installed, or a UserError before anything trains
    state_dir = Path.cwd() / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    search_path = str(config_path.resolve().parent)
    tracking_uri = overrides.tracking_uri or experiment.tracking_uri or default_tracking_uri(Path.cwd())

    try:
        lock_files()  # the measurement lock's private folder: a bad one should not fail every trial
    except PermissionError as error:
        raise UserError(str(error)) from None
    timeout_s = experiment.tracking.timeout_s
    store_lock = state_dir / "store.lock"  # two searches started at once here create the stores one after the other
    tracker, experiment_id = connect_tracking(tracking_uri, experiment.name, timeout_s, log=console.print, lock=store_lock)
    named = None if resume in (None, False, True, RESUME_LATEST) else str(resume)
    interrupted = find_interrupted_search(tracker, experiment_id, experiment.name, config_path, named) if resume else None
    if interrupted is not None and overrides.trials not in (None, interrupted.trials):
        raise UserError(f"--trials: search {interrupted.run_id} was started with {interrupted.trials} trials; a resumed search keeps its budget")
    trials = interrupted.trials if interrupted else overrides.trials or experiment.search.trial_budget or OPEN_ENDED
    concurrency = overrides.concurrency or experiment.search.max_concurrent
    owns_ray = not ray.is_initialized()
    if owns_ray:
        start_ray(overrides.address, search_path, experiment)
    parent = None
    storage_url = optuna_storage_url(tracking_uri, state_dir)
    try:
        baseline = prepare_baseline(experiment, state_dir / "baselines", search_path, log=console.print)
        if interrupted is None:
            with exclusive_file(store_lock, "Waiting for another search, which is creating the Optuna study storage ...", console.print):
                optuna.storages.RDBStorage(storage_url)  # its tables, created once
            check_baseline_learned(experiment, baseline.metrics)
            constraints = Constraints.for_search(
                experiment.min_metric, experiment.max_size_bytes, experiment.max_latency_ms, baseline.metrics, experiment.metric, experiment.max_metric_drop
            )
            record = tracker.start_search(
                experiment_id, experiment.name, time.strftime("search-%Y%m%d-%H%M%S"), objectives=experiment.objectives, constraints=constraints,
                baseline=baseline.metrics, storage_url=storage_url, config_path=config_path, trials=trials,
                params={"config": experiment.model_dump(mode="json", exclude={"space"}), "concurrency": concurrency},
            )
            progress = Progress()
        else:
            record = interrupted  # the baseline figures and constraints the trials before the interruption were judged by
            constraints = record.constraints or Constraints.for_search(
                experiment.min_metric, experiment.max_size_bytes, experiment.max_latency_ms, record.baseline, experiment.metric, experiment.max_metric_drop
            )
            if not study_exists(record.storage_url, record.study_name):
                console.print(f"The Optuna study of search {record.run_id} is gone from {record.storage_url}.")
                console.print(rebuild_study(tracker, experiment_id, record, experiment.space, constraints, config_path))
            progress = reopen_search(tracker, experiment_id, record, experiment.objectives, constraints)
        b, parent, study_name, storage_url = record.baseline, record.run_id, record.study_name, record.storage_url
        console.print(
            f"Baseline: validation {metric} {with_interval(b, metric)}, test {metric} {with_interval(b, f'test_{metric}')}, "
            f"{b['size_bytes'] / 1e6:.3f} MB, {b['latency_ms']:.4f} ms ({int(b['parameters']):,} parameters)"
        )
        verb = "continued" if interrupted else "started"
        console.print(f"MLflow: experiment {experiment.name!r}, search run {parent} {verb} at {tracking_uri}")
        console.print(f"Optuna: study {study_name!r} in {storage_url}")
        default_floor = (
            "" if experiment.min_metric is not None or experiment.max_metric_drop is not None
            else f" (the floor defaults to the baseline's {metric} minus {100 * DEFAULT_DROP:g} points: max_metric_drop)"
        )
        console.print(f"Constraints: {constraints.describe()}{default_floor}")

        setup = TrialSetup(
            task=experiment.task,
            finetune=experiment.finetune,
            measure=experiment.measure,
            seed=experiment.search.seed,
            cpus=experiment.resources.cpu,
            search_path=search_path,
            baseline_weights=baseline.weights,
            baseline_metrics=b,
            tracking_uri=tracking_uri,
            tracking_timeout_s=timeout_s,
            experiment_id=experiment_id,
            parent_run_id=parent,
            gpus=experiment.resources.gpu,
            sensitivity=baseline.sensitivity,
            constraints=constraints,
            stop_rule=StopRule(constraints.min_accuracy, metric=metric) if experiment.search.early_stopping else None,
            measure_throughput="throughput" in experiment.objectives,
            rungs=experiment.rungs(),
        )
        remaining = trials - progress.ended
        deadline = time_budget(experiment, started, concurrency)
        if interrupted:
            done = f"{progress.ended} of {trials}" if trials != OPEN_ENDED else f"{progress.ended}"
            console.print(f"Resuming: {done} trials were done before the interruption." + (" The time budget starts again from now." if deadline else ""))
        if remaining <= 0:
            console.print("Every trial of the budget has run; writing the front.")
        else:
            count = "trials" if trials == OPEN_ENDED else f"up to {remaining} trials" if deadline else f"{remaining} trials"
            within = f" within {describe_seconds(experiment.search.seconds)} (refinement included)" if deadline else ""
            rungs = setup.rungs
            fidelity = experiment.search.multi_fidelity
            ladder = (
                f"; multi-fidelity: measured after {', '.join(map(str, rungs))} epochs, the top 1/{fidelity.reduction_factor:g} "
                "of each rung going on" if rungs else
                f"; multi-fidelity off (auto: on from {MIN_AUTO_RUNGS} rungs, {experiment.finetune.epochs} epochs of fine-tuning give fewer)"
                if fidelity.enabled == "auto" and experiment.finetune.epochs > fidelity.min_epochs else ""
            )
            console.print(f"Running {count}{within}, {concurrency} at a time{ladder} ...")
        trials_started = time.time()
        # the Tune run (a resumed search starts a new one); the parent run id keeps two searches started in one second apart
        run_name = time.strftime("search-%Y%m%d-%H%M%S") + f"-{parent[:8]}"
        repeats = progress.repeats
        if remaining > 0:
            repeats += run_trials(
                experiment, setup, study_name, storage_url, run_name, remaining, concurrency, state_dir, progress, fresh=interrupted is None,
                deadline=deadline,
            )
        if deadline is not None and deadline.refused:
            console.print(f"The time budget leaves no room for another trial at the measured pace; {'refining, then ' if experiment.refine.epochs else ''}writing the front.")
        refine_started = time.time()
        if experiment.refine.epochs > 0:
            refine_front(experiment, setup, tracker, experiment_id, run_name, concurrency, state_dir, console, deadline=deadline)
        spent = {"before the trials": trials_started - started, "trials": refine_started - trials_started, "refinement": time.time() - refine_started}
        summary = summarise(tracker, experiment_id, record, constraints, repeats, spent, config=experiment)  # writes too: the Pareto flags, the outcome
    except KeyboardInterrupt:
        if parent is not None:
            settle(lambda: tracker.interrupted(parent), console)
            console.print(f"Interrupted. Continue this search with: netshrink search {config_path} --resume {parent}")
        raise
    except BaseException as error:
        full = disk_full(error)
        if isinstance(error, TrackingUnavailable):  # a call of the driver's own ran out of retries
            error = SearchStopped(str(error), cause="tracking")
        if not isinstance(error, SearchStopped) and not full:
            if parent is not None:
                settle(lambda: tracker.finish(parent, failed=True), console)
            raise
        reason = str(error) if isinstance(error, SearchStopped) else f"{full} (the stores: {tracking_uri}, {storage_url}; the state folder: {state_dir})"
        if parent is None:
            raise SearchStopped(f"the search stopped before its first trial: {reason}") from None
        gone = isinstance(error, SearchStopped) and error.cause == "tracking"
        if not gone:  # a full disk: the store may still take one small write
            settle(lambda: tracker.interrupted(parent), console)
        then = "When the server answers again," if gone else "Free some space, then"
        raise SearchStopped(
            f"the search stopped: {reason}. Its finished trials are kept in MLflow; a trial cut short runs again first. "
            f"{then} continue it with: netshrink search {config_path} --resume {parent}"
        ) from None
    finally:
        if owns_ray:
            ray.shutdown()

    seconds = time.time() - started
    print_summary(summary, experiment.name, seconds, tracking_uri, console)
    return SearchResult(
        parent_run_id=parent,
        experiment_id=experiment_id,
        tracking_uri=tracking_uri,
        study_name=study_name,
        optuna_storage=storage_url,
        front=summary.front,
        points=summary.points,
        failed=summary.failed,
        closest=summary.closest,
        baseline=b,
        seconds=seconds,
    )
