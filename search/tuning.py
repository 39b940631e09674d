"""The Ray Tune wiring: trials steered by Optuna's multi-objective sampler, and the refinement of the front.

Ray Tune schedules the trials (``trial.run_trial``) on the local machine or a cluster;
the searcher (``searcher.DistinctPipelineSearch``, Ray's ``OptunaSearch``) asks Optuna's
sampler for each pipeline. Refinement replays chosen front points with longer fine-tuning.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from netshrink.config import Experiment
from netshrink.deploy.stopping import Recovery, allowance
from netshrink.spaces import SearchSpace
from netshrink.spaces.start import start_params

from .constraints import Constraints
from .front import TrialPoint, knee_order, pareto_front
from .hypervolume import most_to_gain
from .progress import progress_printer
from .report import collect_points
from .resume import Progress
from .moasha import MultiObjectiveASHA
from .searcher import Deadline, DistinctPipelineSearch
from .tracking import Tracker
from .trial import REFINE_OF, TrialSetup, refine_trial, run_trial


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


LOCK_TYPE = type(threading.Lock())


class PicklableLocks:
    """Mixin for an Optuna sampler: its thread locks are left out of its pickled state and made anew when unpickled.

    Ray Tune pickles the searcher, and with it the sampler, when a search starts (its experiment state, which
    ``--resume`` reads). Optuna 5.1's genetic samplers (NSGA-II) hold a ``threading.Lock``, which cannot be
    pickled: the search failed before its first trial.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        locks = [name for name, value in state.items() if isinstance(value, LOCK_TYPE)]
        for name in locks:
            del state[name]
        return {**state, "_netshrink_locks": locks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        locks = state.pop("_netshrink_locks", [])
        self.__dict__.update(state)
        for name in locks:
            setattr(self, name, threading.Lock())


class NSGAIISampler(PicklableLocks, optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, picklable (``PicklableLocks``)."""


def make_sampler(experiment: Experiment, seed_offset: int = 0):
    """The experiment's sampler. NSGA-II and TPE read each trial's constraint values (``searcher.annotate``).

    ``seed_offset``: a resumed search's sampler must not replay the random draws its first run made.
    """
    settings = experiment.search
    seed = settings.seed + seed_offset
    if settings.sampler == "nsga2":
        return NSGAIISampler(population_size=settings.population_size, seed=seed)
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if settings.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    if settings.sampler == "botorch":
        return botorch_sampler()(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def botorch_sampler():
    """optuna-integration's ``BoTorchSampler`` (qLogNEHVI for several objectives, with the trials' constraint values);
    ``UserError`` naming the extra to install when it is missing. The search calls it before the baseline trains."""
    import importlib.util

    try:
        from optuna_integration import BoTorchSampler

        if importlib.util.find_spec("botorch") is None:
            raise ImportError("botorch")
    except ImportError:
        from netshrink.errors import UserError

        raise UserError("search.sampler: botorch needs optuna-integration and botorch: pip install 'netshrink[botorch]'") from None
    return BoTorchSampler


QUIET_LOGGERS = (
    "ray.tune.execution.tune_controller",  # each failed trial's whole traceback: the progress says it in one line
    "ray.tune.execution.experiment_state",  # a failed copy of Tune's own state (a full disk); --resume does not read it
    "mlflow.store.db.utils",  # a SQLite error MLflow catches, logs with its traceback, and raises again: we report it
)


def quiet_tracebacks() -> None:
    """The driver's libraries log pages of traceback for errors that netshrink then reports in one line (a failed
    trial, a full disk); their loggers are set to CRITICAL. The tracebacks stay in each trial's error file (its Ray
    trial folder) and its MLflow run's ``error`` tag."""
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


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
    deadline: Deadline | None = None,
) -> int:
    """Ray Tune runs the trials; Optuna's multi-objective sampler chooses each one's pipeline.

    A ``fresh`` search (not a resumed one, whose study has them already) starts with the
    informed start (``spaces/start.py``) when ``search.informed_start`` is on.
    Returns how many repeated pipelines were answered from earlier trials instead of run again.
    A failed trial is run again up to ``search.max_failures`` times (see ``run_trial``).

    With ``setup.rungs`` (multi-fidelity), Tune's scheduler is ``moasha.MultiObjectiveASHA``; with ``deadline``
    (a time budget) the searcher starts no trial the time left cannot fit (``searcher.Deadline``).
    """
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Ctrl-C raises KeyboardInterrupt at once; Tune's own handler would end fit() quietly and the
    # search would look finished with part of its budget.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    recovery = Recovery()  # what fine-tuning recovers in this search: the stop rule's allowance, and MO-ASHA's for the metric floor
    searcher = DistinctPipelineSearch(
        recovery=recovery,
        deadline=deadline,
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
    scheduler = scheduler_for(experiment, setup, recovery)
    if scheduler is not None and not fresh:  # a resumed search ranks its new trials against the rungs its earlier ones reached
        scheduler.restore(Tracker(setup.tracking_uri, timeout_s=setup.tracking_timeout_s), setup.experiment_id, setup.parent_run_id)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup),
        {"cpu": experiment.resources.cpu, "gpu": experiment.resources.gpu},
    )
    tuner = tune.Tuner(
        trainable,
        # reuse_actors: a trial runs in the worker process of the one before it, which saves starting a
        # process and importing torch, MLflow and ONNX Runtime again (about 4 s a trial, benchmarks/scale.py)
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=trials, max_concurrent_trials=concurrency, reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=str((state_dir / "ray").resolve()),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=experiment.search.max_failures),
            callbacks=[progress_printer(
                progress.ended + trials, setup.baseline_metrics, done=progress.ended, metric=experiment.metric,
                tracking_uri=setup.tracking_uri, timeout_s=setup.tracking_timeout_s, experiment_id=setup.experiment_id,
                parent_run_id=setup.parent_run_id, deadline=deadline.end if deadline is not None else None,
            )],
        ),
    )
    tuner.fit()
    return searcher.repeats_skipped


def scheduler_for(experiment: Experiment, setup: TrialSetup, recovery: Recovery | None):
    """MO-ASHA over the trials' rungs (``moasha.py``), or None (Tune's FIFO) for a search without rungs."""
    if not setup.rungs:
        return None
    tracker = Tracker(setup.tracking_uri, timeout_s=setup.tracking_timeout_s)

    def expected_rise(share: float) -> float:
        return allowance(recovery.table(), share)[0] if recovery is not None else 0.0

    def log(run_id: str, tags: dict[str, str]) -> None:
        try:
            tracker.log(run_id, tags=tags)
        except Exception as error:  # a decision's note is not worth stopping the search over; the decision stands
            print(f"  note: could not log the rung decision of run {run_id} ({type(error).__name__})", flush=True)

    return MultiObjectiveASHA(
        experiment.objectives, experiment.directions(), setup.rungs, experiment.search.multi_fidelity.reduction_factor, experiment.metric,
        constraints=setup.constraints, allowance=expected_rise, log=log,
    )


def _reached(metrics: dict[str, float], metric: str, reach: float) -> dict[str, float]:
    """``metrics`` as if refinement gained ``reach`` of the metric, in torch and in ONNX alike."""
    return {**metrics, **{key: metrics[key] + reach for key in (metric, f"onnx_{metric}") if key in metrics}}


def points_to_refine(trials: list[TrialPoint], experiment: Experiment, baseline: dict[str, float], constraints: Constraints | None) -> list[TrialPoint]:
    """The trials ``refine.points`` asks for: the whole front, the front that meets the search's ``constraints``
    (``min_accuracy`` and the others), the ``refine.count`` points of that front nearest its knee
    (``front.knee_order``), or the ``refine.count`` trials with the most hypervolume to gain from longer fine-tuning
    (``hypervolume.most_to_gain``) among those that meet the constraints, or would with ``refine.reach`` more accuracy.

    Why the reach: 3 epochs leave distillation + channel pruning 0.75 + 4 bits 4.4 to 7 points under the baseline
    on the built-in task, at or under ``min_accuracy``, and 15 epochs (at lr 0.002) bring it back to within 0.3
    points, at under a fifth of the baseline's latency (docs/search.md, "Refinement"): the trial that refinement pays
    most for is often the one its short fine-tuning left infeasible."""
    refine = experiment.refine
    if refine.points == "all":
        return pareto_front(trials, experiment.objectives, experiment.directions())
    front = pareto_front(trials, experiment.objectives, experiment.directions(), constraints)
    if refine.points == "above_min_accuracy":
        return front
    if refine.points == "knee":
        return knee_order(front, experiment.objectives)[: refine.count]
    within_reach = [point for point in trials if constraints is None or constraints.feasible(_reached(point.metrics(), experiment.metric, refine.reach))]
    floor = constraints.min_accuracy if constraints is not None else None
    return most_to_gain(within_reach, front, experiment.objectives, baseline, refine.count, floor)


def refine_front(
    experiment: Experiment, setup: TrialSetup, tracker: Tracker, experiment_id: str, run_name: str, concurrency: int, state_dir: Path, console: Console,
    deadline: Deadline | None = None,
) -> None:
    """Fine-tune the chosen front points for ``refine.epochs`` on Ray Tune, each as a child run of its own.

    A refined run replays its trial's recipe on the baseline with the longer
    fine-tuning and is measured like any trial; it names its trial in
    ``refined_from`` and is no Optuna trial. Points refined before (a resumed
    search) are not refined again.
    """
    from dataclasses import replace

    from ray import tune

    points, _ = collect_points(tracker, experiment_id, setup.parent_run_id, experiment.metric)
    done = {point.refined_from for point in points if point.refined_from}
    trials = [p for p in points if p.refined_from is None]
    chosen = [point for point in points_to_refine(trials, experiment, setup.baseline_metrics, setup.constraints) if point.run_id not in done]
    chosen = list({point.run_id: point for point in reversed(chosen)}.values())[::-1]  # a slimmable trial once, not once per width
    if not chosen:
        return
    refine = experiment.refine
    epochs = refine.epochs
    if deadline is not None:  # a time budget: the points that fit, best first, each at its own trial's pace
        seconds = [deadline.refined_seconds(point.extra) for point in chosen]
        fits = deadline.fitting(seconds, concurrency)
        known = [s for s in seconds if s is not None]
        each = f"about {min(known):.0f} to {max(known):.0f} s each" if known else "their time unknown"
        if not fits:  # not one at full length: the best point, with the epochs the time left holds, if more than a trial's
            fit = deadline.epochs_fitting(chosen[0].extra)
            if fit <= experiment.finetune.epochs:
                console.print(f"The time budget leaves no room to refine any of the {len(chosen)} point(s) ({each}).")
                return
            console.print(f"The time budget leaves room to refine {chosen[0].name} for {fit} of its {refine.epochs} epochs ({each} at full length).")
            chosen, epochs = chosen[:1], fit
        elif len(fits) < len(chosen):
            console.print(f"The time budget leaves room for {len(fits)} of the {len(chosen)} point(s) to refine ({each}, {concurrency} at a time).")
            chosen = [chosen[index] for index in fits]
    console.print(f"Refining {len(chosen)} front point(s) ({', '.join(p.name for p in chosen)}) with {epochs} epochs of fine-tuning ...")
    longer = replace(
        setup, finetune=experiment.finetune.model_copy(update={"epochs": epochs, "lr": refine.lr or experiment.finetune.lr}), rungs=(),
    )
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
            callbacks=[progress_printer(
                len(chosen), setup.baseline_metrics, label="refined ", metric=experiment.metric,
                tracking_uri=setup.tracking_uri, timeout_s=setup.tracking_timeout_s, experiment_id=setup.experiment_id,
                parent_run_id=setup.parent_run_id,
            )],
        ),
    ).fit()
