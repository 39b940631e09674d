"""``netshrink search --resume``: continue an interrupted search in place.

Ctrl-C, a killed or crashed driver, a lost head node: whatever stopped a search,
what it had done survives in the two stores it writes as it goes. MLflow holds
the parent run and one child run per trial with its metrics; the Optuna study
holds what the sampler has learnt. Tune's pickled experiment state is not used:
it lags those stores and describes trial actors that no longer exist.

Resuming reopens the same parent run and the same study, settles what the
interruption left half done, and hands the rest of the budget to a new Tune run:

- a trial whose child run finished while its Optuna trial is still RUNNING (the
  driver died between the two writes) is told to Optuna with the child's
  metrics, not run again;
- any other trial left RUNNING in Optuna is marked FAIL and its parameters are
  enqueued (the new trial names it in ``retry_of``), so the interrupted pipeline
  runs again first; its child run is marked KILLED;
- trials still WAITING in the study's queue (the informed start's, enqueued when the
  search began) go to the back of it, behind the reruns: Optuna hands out the oldest
  waiting trial first, and a rerun queued behind them could find the budget spent.
  Each is marked FAIL and enqueued again, naming it in ``requeued_of``.

A search whose Optuna study is gone (``optuna.db`` deleted) has its study rebuilt
from its MLflow runs, which hold every trial's parameters, recipe and figures
(``rebuild_study``): each measured trial is replayed through the search space with
its logged parameters, checked to give its logged recipe, and told its logged
figures; a failed one is added as failed; a cut one runs again first. Trials
answered without a run (repeats, the uncompressed baseline) cost no budget and are
not rebuilt. If the study cannot be rebuilt, that is one line with the command that
starts afresh and the one that marks the search ended (``--abandon``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import optuna

from netshrink.errors import UserError

from .constraints import Constraints
from .searcher import REPEAT_OF, UNCOMPRESSED, Evaluated, annotate
from .tracking import CONFIG_ARTIFACT, OPTUNA_TRIAL_TAG, RECIPE_TAG, ROLE_TAG, STOPPED_TAG, SearchRecord, Tracker, text_sha256

RETRY_OF = "retry_of"  # user attribute of an enqueued Optuna trial: the number of the interrupted trial it runs again
REQUEUED_OF = "requeued_of"  # user attribute of a waiting trial moved behind the reruns: the number it had before


@dataclass(frozen=True)
class Progress:
    """How far a search got; all zero for a new one."""

    ended: int = 0  # trials that count against the budget: finished, or failed after their retries
    evaluated: Evaluated = field(default_factory=dict)  # the finished pipelines, for the searcher's repeat table
    repeats: int = 0  # proposals answered from an earlier trial so far
    study_trials: int = 0  # every trial in the study, repeats and failures included


def find_interrupted_search(
    tracker: Tracker, experiment_id: str, experiment_name: str, config_path: Path, run_id: str | None = None
) -> SearchRecord:
    """The search to resume: ``run_id``, or the latest search of this experiment that did not finish and was not
    abandoned. It must have run this same experiment file."""
    hint = f"start a new one with: netshrink search {config_path}"
    if run_id is None:
        record = tracker.latest_search(experiment_id, unfinished=True)
        if record is None:
            raise UserError(f"--resume: experiment {experiment_name!r} has no interrupted search in {tracker.uri}; {hint}")
    else:
        record = _named_search(tracker, experiment_id, experiment_name, run_id)
        if record.status == "FINISHED":
            raise UserError(f"--resume {run_id}: that search finished; there is nothing to resume. To search again, {hint}")
        if record.abandoned:
            raise UserError(f"--resume {run_id}: that search was abandoned (--abandon); {hint}")
    logged = _logged_experiment_file(tracker, record.run_id)
    if logged is None or record.study_name is None or record.storage_url is None or record.trials is None:
        raise UserError(f"--resume: search {record.run_id} of {experiment_name!r} stopped before its first trial; {hint}")
    # the task is rebuilt from the local file, never from the logged copy (a tracking server may be shared);
    # the two must be the same file
    if text_sha256(config_path.read_text()) != (record.config_sha256 or text_sha256(logged)):
        raise UserError(
            f"--resume: {config_path} has changed since search {record.run_id} started; a resumed search must run the same experiment "
            f"file (the search's copy is its MLflow artifact {CONFIG_ARTIFACT}). Restore the file, or start a new search without --resume"
        )
    return record


def _named_search(tracker: Tracker, experiment_id: str, experiment_name: str, run_id: str) -> SearchRecord:
    run = tracker.find_run(run_id)
    if run is None:
        raise UserError(f"no MLflow run has the id {run_id!r} at {tracker.uri}")
    if run.info.experiment_id != experiment_id or run.data.tags.get(ROLE_TAG) != "search":
        raise UserError(f"run {run_id} is not a search of experiment {experiment_name!r}")
    return tracker.search_record(run)


def abandon_search(tracker: Tracker, experiment_id: str, experiment_name: str, run_id: str) -> SearchRecord:
    """Mark a search that will not be resumed as ended: KILLED, tagged ``netshrink.abandoned``, its trials still RUNNING
    KILLED too. ``--resume`` no longer picks it; its finished trials stay, and ``front`` and ``export`` still read them."""
    record = _named_search(tracker, experiment_id, experiment_name, run_id)
    if record.status == "FINISHED":
        raise UserError(f"--abandon {run_id}: that search finished; only an unfinished one can be abandoned")
    for run in tracker.trial_runs(experiment_id, run_id):
        if run.info.status == "RUNNING":
            tracker.interrupted(run.info.run_id)
    tracker.abandon(run_id)
    return record


REBUILT_FROM = "rebuilt_from"  # user attribute of a trial of a rebuilt study: the number its MLflow run names


def parse_param(text: str):
    """A knob's value as MLflow keeps it (``str(value)``) back in its Python type: 0.35, 4, True, "channel", None."""
    import yaml

    if text == "None":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # 1e-05: YAML 1.1 reads a float without a dot as a string
        except ValueError:
            return value
    return value if isinstance(value, (bool, int, float)) else text


def rebuild_study(tracker: Tracker, experiment_id: str, search: SearchRecord, space, constraints: Constraints | None, config_path: Path) -> str:
    """Make ``search``'s Optuna study again from its MLflow trial runs (see the module docstring); returns what was
    done, in words. ``UserError`` with the commands that go on without it if it cannot be made."""
    from netshrink.techniques import Pipeline

    from .tuning import SpaceSampler

    def same(a: str | None, b: str) -> bool:
        return a is not None and Pipeline.from_recipe(a).recipe() == Pipeline.from_recipe(b).recipe()

    try:
        study = optuna.create_study(
            study_name=search.study_name, storage=search.storage_url, directions=["maximize" if d == "max" else "minimize" for d in search.directions]
        )
    except Exception as error:
        raise UserError(
            f"--resume: search {search.run_id}'s Optuna study {search.study_name!r} is gone from {search.storage_url} (was optuna.db "
            f"deleted or moved?), and it cannot be made again there ({type(error).__name__}: {error}). Mark the search ended with: "
            f"netshrink search {config_path} --abandon {search.run_id}; then start a new one with: netshrink search {config_path}"
        ) from None
    sampler = SpaceSampler(space)
    runs = [run for run in tracker.trial_runs(experiment_id, search.run_id) if OPTUNA_TRIAL_TAG in run.data.tags]
    runs.sort(key=lambda run: int(run.data.tags[OPTUNA_TRIAL_TAG]))
    measured = {run.info.run_id for run in runs if _measured(run, search.objectives)}
    done = {run.data.tags.get(RECIPE_TAG) for run in runs if run.info.run_id in measured}
    told = failed = redo = unmatched = 0
    for run in runs:
        number = int(run.data.tags[OPTUNA_TRIAL_TAG])
        params = {key: parse_param(value) for key, value in run.data.params.items() if "/" in key}
        if run.info.run_id in measured:
            study.enqueue_trial(params, user_attrs={REBUILT_FROM: number})
            trial = study.ask()
            if not same(run.data.tags.get(RECIPE_TAG), sampler(trial)["recipe"]):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)  # the space no longer gives its recipe: counted, not learnt from
                unmatched += 1
                continue
            metrics = run.data.metrics
            annotate(trial, metrics, constraints)
            study.tell(trial, [metrics[name] for name in search.objectives])
            told += 1
        elif run.info.status == "FAILED":
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={REBUILT_FROM: number}))
            failed += 1
        elif run.data.tags.get(RECIPE_TAG) not in done:  # cut short, and not run again since
            study.enqueue_trial(params, user_attrs={RETRY_OF: number, REBUILT_FROM: number})
            redo += 1
    parts = [f"{told} measured trial(s)", f"{failed} failed", f"{redo} cut short, to run again first"]
    if unmatched:
        parts.append(f"{unmatched} whose parameters no longer give their recipe (counted, not learnt from)")
    return f"Rebuilt it from the search's MLflow runs: {', '.join(parts)}."


def _measured(run, objectives: list[str]) -> bool:
    return (run.info.status == "FINISHED" or run.data.tags.get(STOPPED_TAG) == "true") and set(objectives) <= run.data.metrics.keys()


def study_exists(storage_url: str, study_name: str) -> bool:
    """Whether the study is in its storage, without creating the storage: loading from a SQLite file that is not
    there would create an empty one."""
    if storage_url.startswith("sqlite:///") and not Path(storage_url.removeprefix("sqlite:///")).is_file():
        return False
    try:
        return study_name in optuna.study.get_all_study_names(storage=storage_url)
    except Exception:  # a damaged or foreign file: SQLAlchemy raises many types
        return False


def _logged_experiment_file(tracker: Tracker, run_id: str) -> str | None:
    try:
        return tracker.read_text(run_id, CONFIG_ARTIFACT)
    except Exception:  # MLflow raises several types for a missing artifact
        return None


def reopen_search(tracker: Tracker, experiment_id: str, search: SearchRecord, objectives: list[str], constraints: Constraints) -> Progress:
    """Set the parent run RUNNING again and settle the trials the interruption cut short (see the module docstring)."""
    tracker.reopen(search.run_id)
    storage = optuna.storages.RDBStorage(search.storage_url)
    study = optuna.load_study(study_name=search.study_name, storage=storage)
    children = tracker.trial_runs(experiment_id, search.run_id)
    finished = {  # measured trials, those early stopping ended included; not refined runs
        int(run.data.tags[OPTUNA_TRIAL_TAG]): run for run in children if _measured(run, objectives) and OPTUNA_TRIAL_TAG in run.data.tags
    }
    cut_short = set()
    state = optuna.trial.TrialState
    for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        run = finished.get(trial.number)
        if run is not None:
            metrics = run.data.metrics
            annotate(optuna.trial.Trial(study, trial._trial_id), metrics, constraints)  # as the searcher would have
            study.tell(trial.number, [metrics[name] for name in objectives])
        else:
            study.tell(trial.number, state=state.FAIL)
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
            cut_short.add(trial.number)
    if cut_short:  # the reruns first: what waited in the queue before them goes behind them
        for trial in study.get_trials(deepcopy=False, states=(state.WAITING,)):
            if trial.user_attrs.get(RETRY_OF) in cut_short:
                continue  # a rerun enqueued above
            if storage.set_trial_state_values(trial._trial_id, state=state.FAIL):
                study.enqueue_trial(trial.system_attrs.get("fixed_params", {}), user_attrs={**trial.user_attrs, REQUEUED_OF: trial.number})
    for run in children:
        status = run.info.status
        if status == "RUNNING" or (status not in ("FINISHED", "KILLED") and int(run.data.tags.get(OPTUNA_TRIAL_TAG, -1)) in cut_short):
            tracker.interrupted(run.info.run_id)
    trials = study.get_trials(deepcopy=False)
    return Progress(
        ended=ended_trials(trials),
        evaluated={run.data.tags[RECIPE_TAG]: (number, dict(run.data.metrics)) for number, run in finished.items()},
        repeats=sum(REPEAT_OF in trial.user_attrs for trial in trials),
        study_trials=len(trials),
    )


def ended_trials(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that used up budget: complete ones that were not answered without training (repeats, the
    uncompressed baseline), failed ones that were not interrupted or moved in the queue."""
    retried = {trial.user_attrs[key] for trial in trials for key in (RETRY_OF, REQUEUED_OF) if key in trial.user_attrs}
    state = optuna.trial.TrialState
    return sum(
        (trial.state == state.COMPLETE and not {REPEAT_OF, UNCOMPRESSED} & trial.user_attrs.keys())
        or (trial.state == state.FAIL and trial.number not in retried)
        for trial in trials
    )
