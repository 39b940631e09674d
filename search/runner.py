"""``netshrink search``: baseline, then Ray Tune trials steered by Optuna, then the Pareto front in MLflow."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from netshrink.config import Experiment
from netshrink.errors import UserError
from netshrink.node_lock import lock_files
from netshrink.spaces import SearchSpace
from netshrink.spaces.start import start_params

from .baseline import prepare_baseline
from .constraints import DEFAULT_DROP, Constraints
from .front import TrialPoint, front_json, knee_order, pareto_front, print_front, with_interval
from .plots import log_plots
from .report import collect_points
from .resume import Progress, find_interrupted_search, reopen_search
from .searcher import DistinctPipelineSearch
from netshrink.deploy.stopping import StopRule
from .tracking import CONFIG_ARTIFACT, CONFIG_HASH_TAG, PARETO_TAG, Tracker, default_tracking_uri, is_local, text_sha256
from .trial import REFINE_OF, TrialSetup, refine_trial, run_trial

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
    baseline: dict[str, float]
    seconds: float


class SpaceSampler:
    """Define-by-run function for ``OptunaSearch``: samples a pipeline and hands the trial its recipe.

    Returning the recipe (instead of letting each trial rebuild it) means the
    pipeline is validated once, in the driver, and the trial replays exactly it.
    """

    def __init__(self, space: SearchSpace) -> None:  # type: ignore[valid-type]
        self.space = space

    def __call__(self, trial) -> dict[str, Any]:
        pipeline = self.space.sample(trial)
        return {"recipe": pipeline.recipe(), "optuna_trial": trial.number}


def make_sampler(experiment: Experiment, seed_offset: int = 0):
    """The experiment's sampler. NSGA-II and TPE read each trial's constraint values (``searcher.annotate``).

    ``seed_offset``: a resumed search's sampler must not replay the random draws its first run made.
    """
    import optuna

    settings = experiment.search
    seed = settings.seed + seed_offset
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=settings.population_size, seed=seed)
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def optuna_storage_url(tracking_uri: str, state_dir: Path) -> str:
    """Next to the MLflow store when that is a local SQLite file, else in the state folder."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).resolve().parent / 'optuna.db'}"
    return f"sqlite:///{(state_dir / 'optuna.db').resolve()}"


def run_search(
    experiment: Experiment, config_path: Path, overrides: Overrides = Overrides(), console: Console | None = None, resume: bool = False
) -> SearchResult:
    """Run one search end to end, or with ``resume`` finish the latest interrupted one (see ``resume.py``).

    Problems with the tracking server, the Ray cluster or the search to resume are
    reported as ``UserError`` before the baseline is trained.
    """
    import ray

    console = console or Console()
    started = time.time()
    state_dir = Path.cwd() / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    search_path = str(config_path.resolve().parent)
    tracking_uri = overrides.tracking_uri or experiment.tracking_uri or default_tracking_uri(Path.cwd())

    try:
        lock_files()  # the measurement lock's private folder: a bad one should not fail every trial
    except PermissionError as error:
        raise UserError(str(error)) from None
    tracker, experiment_id = connect_tracking(tracking_uri, experiment.name)
    interrupted = find_interrupted_search(tracker, experiment_id, experiment.name, config_path) if resume else None
    if interrupted is not None and overrides.trials not in (None, interrupted.trials):
        raise UserError(f"--trials: search {interrupted.parent_run_id} was started with {interrupted.trials} trials; a resumed search keeps its budget")
    trials = interrupted.trials if interrupted else overrides.trials or experiment.search.trials
    concurrency = overrides.concurrency or experiment.search.max_concurrent
    owns_ray = not ray.is_initialized()
    if owns_ray:
        start_ray(overrides.address, search_path, experiment)
    parent = None
    try:
        baseline = prepare_baseline(experiment, state_dir / "baselines", search_path, log=console.print)
        storage_url = optuna_storage_url(tracking_uri, state_dir)
        if interrupted is None:
            b = baseline.metrics
            constraints = Constraints.for_search(experiment.min_accuracy, experiment.max_size_bytes, experiment.max_latency_ms, b)
            parent, study_name = start_parent_run(tracker, experiment_id, experiment, config_path, storage_url, b, trials, concurrency, constraints)
            progress = Progress()
        else:
            b = interrupted.baseline  # the figures the trials before the interruption were compared with
            constraints = interrupted.constraints or Constraints.for_search(experiment.min_accuracy, experiment.max_size_bytes, experiment.max_latency_ms, b)
            parent, study_name, storage_url = interrupted.parent_run_id, interrupted.study_name, interrupted.storage_url
            progress = reopen_search(tracker, experiment_id, interrupted, experiment.objectives, constraints)
        console.print(
            f"Baseline: validation accuracy {with_interval(b, 'accuracy')}, test accuracy {with_interval(b, 'test_accuracy')}, "
            f"{b['size_bytes'] / 1e6:.3f} MB, {b['latency_ms']:.4f} ms ({int(b['parameters']):,} parameters)"
        )
        verb = "continued" if interrupted else "started"
        console.print(f"MLflow: experiment {experiment.name!r}, search run {parent} {verb} at {tracking_uri}")
        console.print(f"Optuna: study {study_name!r} in {storage_url}")
        default_floor = "" if experiment.min_accuracy is not None else f" (min_accuracy defaults to the baseline's minus {100 * DEFAULT_DROP:g} points)"
        console.print(f"Constraints: {constraints.describe()}{default_floor}")

        setup = TrialSetup(
            task=experiment.task,
            finetune=experiment.finetune,
            measure=experiment.measure,
            seed=experiment.search.seed,
            cpus=experiment.resources.cpu,
            search_path=search_path,
            baseline_weights=baseline.artifact.read_bytes(),
            baseline_metrics=b,
            tracking_uri=tracking_uri,
            experiment_id=experiment_id,
            parent_run_id=parent,
            gpus=experiment.resources.gpu,
            sensitivity=baseline.sensitivity,
            constraints=constraints,
            stop_rule=StopRule(constraints.min_accuracy) if experiment.search.early_stopping else None,
        )
        remaining = trials - progress.ended
        if interrupted:
            console.print(f"Resuming: {progress.ended} of {trials} trials were done before the interruption.")
        console.print(f"Running {remaining} trials, {concurrency} at a time ...")
        run_name = time.strftime("search-%Y%m%d-%H%M%S")  # the Tune run; a resumed search starts a new one
        repeats = progress.repeats
        if remaining > 0:
            repeats += run_trials(experiment, setup, study_name, storage_url, run_name, remaining, concurrency, state_dir, progress, fresh=interrupted is None)
        if experiment.refine.epochs > 0:
            refine_front(experiment, setup, tracker, experiment_id, run_name, concurrency, state_dir, console)
    except KeyboardInterrupt:
        if parent is not None:
            tracker.interrupted(parent)
            console.print(f"Interrupted. Continue this search with: netshrink search {config_path} --resume")
        raise
    except BaseException:
        if parent is not None:
            tracker.finish(parent, failed=True)
        raise
    finally:
        if owns_ray:
            ray.shutdown()

    points, failed = collect_points(tracker, experiment_id, parent)
    front = pareto_front(points, experiment.objectives, experiment.directions(), constraints)
    on_front = {p.run_id for p in front}
    for point in points:
        tracker.client.set_tag(point.run_id, PARETO_TAG, "true" if point.run_id in on_front else "false")
    tracker.log(parent, metrics={"trials_finished": len(points), "trials_failed": failed, "front_size": len(front), "repeats_skipped": repeats})
    if repeats:
        console.print(f"The sampler proposed {repeats} pipeline(s) already evaluated; their earlier results were reused, not retrained.")
    tracker.client.log_text(parent, front_json(front, b), "front.json")
    log_plots(tracker, parent, points, front, b, experiment.objectives, constraints.min_accuracy)
    tracker.finish(parent)
    seconds = time.time() - started
    print_front(front, b, title=f"Pareto front of {experiment.name!r}: {len(front)} of {len(points)} finished trials ({failed} failed), {seconds:.0f} s", console=console)
    if is_local(tracking_uri):
        console.print(f"Browse it: mlflow ui --backend-store-uri {tracking_uri}")
    return SearchResult(
        parent_run_id=parent,
        experiment_id=experiment_id,
        tracking_uri=tracking_uri,
        study_name=study_name,
        optuna_storage=storage_url,
        front=front,
        points=points,
        failed=failed,
        baseline=b,
        seconds=seconds,
    )


def start_parent_run(
    tracker: Tracker, experiment_id: str, experiment: Experiment, config_path: Path, storage_url: str, baseline: dict[str, float], trials: int, concurrency: int,
    constraints: Constraints,
) -> tuple[str, str]:
    """The search's MLflow run, holding everything ``--resume`` needs to continue it; returns its id and the Optuna study's name."""
    parent = tracker.start_search(
        experiment_id,
        time.strftime("search-%Y%m%d-%H%M%S"),
        params={"config": experiment.model_dump(mode="json", exclude={"space"}), "trials": trials, "concurrency": concurrency},
        tags={
            "optuna.storage": storage_url,
            "config_file": str(config_path.resolve()),  # export imports module:factory references from its folder
            "objectives": json.dumps(experiment.objectives),
            **constraints.to_tags(),  # as in force, min_accuracy's default resolved
        },
    )
    study_name = f"{experiment.name}/{parent}"
    tracker.log(parent, metrics={f"baseline_{key}": value for key, value in baseline.items()}, tags={"optuna.study_name": study_name})
    text = config_path.read_text()
    tracker.log(parent, tags={CONFIG_HASH_TAG: text_sha256(text)})
    tracker.client.log_text(parent, text, CONFIG_ARTIFACT)
    return parent, study_name


def connect_tracking(tracking_uri: str, experiment_name: str) -> tuple[Tracker, str]:
    """Reach the MLflow store now: a wrong URI or a server that is down should not cost a baseline training."""
    if tracking_uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10) as response:
                response.read()
        except OSError as error:
            raise UserError(f"--tracking-uri / tracking_uri: no MLflow server answers at {tracking_uri} ({error})") from None
    elif tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise UserError(f"--tracking-uri / tracking_uri: folder {folder} of the SQLite store does not exist")
    try:
        tracker = Tracker(tracking_uri)
        return tracker, tracker.experiment_id(experiment_name)
    except Exception as error:  # MLflow raises many types for a bad URI
        raise UserError(f"--tracking-uri / tracking_uri: cannot use MLflow store {tracking_uri!r}: {type(error).__name__}: {error}") from None


def start_ray(address: str | None, search_path: str, experiment: Experiment) -> None:
    """Start a local Ray, or join ``address``; check that one trial's resources fit somewhere."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address not in (None, "auto", "local"):
        probe_address(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [search_path, os.environ.get("PYTHONPATH")]))}},
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UserError(f"--address: cannot connect to a Ray cluster at {address!r}: {error}") from None
    if address is None:  # a local Ray has all the resources it will ever have; a cluster may autoscale
        available = ray.cluster_resources()
        wanted = experiment.resources
        problems = []
        if wanted.cpu > available.get("CPU", 0):
            problems.append(f"resources.cpu: a trial asks for {wanted.cpu} CPUs, this machine has {available.get('CPU', 0):g}")
        if wanted.gpu > available.get("GPU", 0):
            problems.append(f"resources.gpu: a trial asks for {wanted.gpu} GPUs, this machine has {available.get('GPU', 0):g}")
        if problems:
            ray.shutdown()
            raise UserError(problems, title="trials could never start")


def probe_address(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at a Ray address (``ray.init`` retries for long)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address: expected 'auto', 'HOST:PORT' or 'ray://HOST:PORT', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserError(f"--address: cannot connect to a Ray cluster at {address!r}: {error}") from None


def run_trials(
    experiment: Experiment,
    setup: TrialSetup,
    study_name: str,
    storage_url: str,
    run_name: str,
    trials: int,
    concurrency: int,
    state_dir: Path,
    progress: Progress = Progress(),
    fresh: bool = True,
) -> int:
    """Ray Tune runs the trials; Optuna's multi-objective sampler chooses each one's pipeline.

    A ``fresh`` search (not a resumed one, whose study has them already) starts with the
    informed start (``spaces/start.py``) when ``search.informed_start`` is on.
    Returns how many repeated pipelines were answered from earlier trials instead of run again.
    A failed trial is run again up to ``search.max_failures`` times (see ``run_trial``).
    """
    import optuna
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Ctrl-C raises KeyboardInterrupt at once; Tune's own handler would end fit() quietly and the
    # search would look finished with part of its budget.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    searcher = DistinctPipelineSearch(
        baseline_metrics=setup.baseline_metrics,
        constraints=setup.constraints,
        skip_repeats=experiment.search.skip_repeats,
        evaluated=progress.evaluated,
        space=SpaceSampler(experiment.space),
        metric=list(experiment.objectives),
        mode=experiment.directions(),
        sampler=make_sampler(experiment, seed_offset=progress.study_trials),
        storage=optuna.storages.RDBStorage(storage_url),
        study_name=study_name,
        points_to_evaluate=start_params(experiment.space) if fresh and experiment.search.informed_start else None,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup),
        {"cpu": experiment.resources.cpu, "gpu": experiment.resources.gpu},
    )
    tuner = tune.Tuner(
        trainable,
        # reuse_actors: a trial runs in the worker process of the one before it, which saves starting a
        # process and importing torch, MLflow and ONNX Runtime again (about 4 s a trial, benchmarks/scale.py)
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=trials, max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=str((state_dir / "ray").resolve()),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=experiment.search.max_failures),
            callbacks=[progress_printer(progress.ended + trials, setup.baseline_metrics, done=progress.ended)],
        ),
    )
    tuner.fit()
    return searcher.repeats_skipped


def points_to_refine(trials: list[TrialPoint], experiment: Experiment) -> list[TrialPoint]:
    """The trials ``refine.points`` asks for: the whole front, the front at ``min_accuracy`` or above, or the
    ``refine.count`` points nearest its knee (see ``front.knee_order``)."""
    refine = experiment.refine
    if refine.points == "all":
        return pareto_front(trials, experiment.objectives, experiment.directions())
    front = pareto_front(trials, experiment.objectives, experiment.directions(), experiment.min_accuracy)
    return front if refine.points == "above_min_accuracy" else knee_order(front, experiment.objectives)[: refine.count]


def refine_front(
    experiment: Experiment, setup: TrialSetup, tracker: Tracker, experiment_id: str, run_name: str, concurrency: int, state_dir: Path, console: Console
) -> None:
    """Fine-tune the chosen front points for ``refine.epochs`` on Ray Tune, each as a child run of its own.

    A refined run replays its trial's recipe on the baseline with the longer
    fine-tuning and is measured like any trial; it names its trial in
    ``refined_from`` and is no Optuna trial. Points refined before (a resumed
    search) are not refined again.
    """
    from dataclasses import replace

    from ray import tune

    points, _ = collect_points(tracker, experiment_id, setup.parent_run_id)
    done = {point.refined_from for point in points if point.refined_from}
    chosen = [point for point in points_to_refine([p for p in points if p.refined_from is None], experiment) if point.run_id not in done]
    if not chosen:
        return
    refine = experiment.refine
    console.print(f"Refining {len(chosen)} front point(s) ({', '.join(p.name for p in chosen)}) with {refine.epochs} epochs of fine-tuning ...")
    longer = replace(setup, finetune=experiment.finetune.model_copy(update={"epochs": refine.epochs, "lr": refine.lr or experiment.finetune.lr}))
    trainable = tune.with_resources(
        tune.with_parameters(refine_trial, setup=longer), {"cpu": experiment.resources.cpu, "gpu": experiment.resources.gpu}
    )
    configs = [{"recipe": point.recipe, "run_name": f"{point.name}-refined", REFINE_OF: point.run_id} for point in chosen]
    tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"{run_name}-refine",
            storage_path=str((state_dir / "ray").resolve()),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=experiment.search.max_failures),
            callbacks=[progress_printer(len(chosen), setup.baseline_metrics, label="refined ")],
        ),
    ).fit()


def progress_printer(total: int, baseline: dict[str, float], done: int = 0, label: str = ""):
    """Tune callback printing one line per finished, failed or retried trial (Tune pickles it: it holds no console).

    ``done``: trials a resumed search had finished before, so the count goes on from there.
    """
    from ray.tune import Callback

    class ProgressPrinter(Callback):
        def __init__(self) -> None:
            self.done = done

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            r = trial.last_result or {}
            if "accuracy" not in r:
                return
            stopped = ""
            if r.get("stopped_early"):
                share = r["stopped_at_fraction"]
                stopped = f"stopped after {share:.0%} of fine-tuning, " if share > 0 else "stopped before fine-tuning, "
            print(
                f"[{label}{self.done}/{total}] {stopped}acc {r['accuracy']:.2%}  size {r['size_bytes'] / 1e3:.1f} KB "
                f"({baseline['size_bytes'] / r['size_bytes']:.1f}x smaller)  latency {r['latency_ms']:.4f} ms "
                f"({baseline['latency_ms'] / r['latency_ms']:.2f}x)  {_describe(trial.config.get('recipe') or trial.config.get('point', {}).get('recipe'))}",
                flush=True,
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[{label}{self.done}/{total}] trial failed: {_first_error_line(trial)}", flush=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"trial {trial.trial_id} failed ({_first_error_line(trial)}), running it again", flush=True)

    return ProgressPrinter()


def _describe(recipe: str | None) -> str:
    from netshrink.techniques import Pipeline

    return Pipeline.from_recipe(recipe).describe() if recipe else ""


def _first_error_line(trial, limit: int = 200) -> str:
    """The exception's message, cut short: Ray's message for a dead worker runs to 800 characters."""
    try:
        text = Path(trial.error_file).read_text().strip().splitlines()
    except (OSError, TypeError):
        return "see the Ray trial folder"
    line = text[-1] if text else "see the Ray trial folder"
    return line if len(line) <= limit else line[: limit - 3] + "..."
