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
  runs again first; its child run is marked KILLED.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import optuna

from netshrink.errors import UserError

from .constraints import Constraints
from .searcher import REPEAT_OF, UNCOMPRESSED, Evaluated, annotate
from .tracking import CONFIG_ARTIFACT, OPTUNA_TRIAL_TAG, RECIPE_TAG, STOPPED_TAG, SearchRecord, Tracker, text_sha256

RETRY_OF = "retry_of"  # user attribute of an enqueued Optuna trial: the number of the interrupted trial it runs again


@dataclass(frozen=True)
class Progress:
    """How far a search got; all zero for a new one."""

    ended: int = 0  # trials that count against the budget: finished, or failed after their retries
    evaluated: Evaluated = field(default_factory=dict)  # the finished pipelines, for the searcher's repeat table
    repeats: int = 0  # proposals answered from an earlier trial so far
    study_trials: int = 0  # every trial in the study, repeats and failures included


def find_interrupted_search(tracker: Tracker, experiment_id: str, experiment_name: str, config_path: Path) -> SearchRecord:
    """The latest search of this experiment that did not finish; it must have run this same experiment file."""
    record = tracker.latest_search(experiment_id, unfinished=True)
    if record is None:
        raise UserError(f"--resume: experiment {experiment_name!r} has no interrupted search in {tracker.uri}; start one without --resume")
    logged = _logged_experiment_file(tracker, record.run_id)
    if logged is None or record.study_name is None or record.storage_url is None or record.trials is None:
        raise UserError(f"--resume: search {record.run_id} of {experiment_name!r} stopped before its first trial; start it again without --resume")
    # the task is rebuilt from the local file, never from the logged copy (a tracking server may be shared);
    # the two must be the same file
    if text_sha256(config_path.read_text()) != (record.config_sha256 or text_sha256(logged)):
        raise UserError(
            f"--resume: {config_path} has changed since search {record.run_id} started; a resumed search must run the same experiment "
            f"file (the search's copy is its MLflow artifact {CONFIG_ARTIFACT}). Restore the file, or start a new search without --resume"
        )
    return record


def _logged_experiment_file(tracker: Tracker, run_id: str) -> str | None:
    try:
        return tracker.read_text(run_id, CONFIG_ARTIFACT)
    except Exception:  # MLflow raises several types for a missing artifact
        return None


def reopen_search(tracker: Tracker, experiment_id: str, search: SearchRecord, objectives: list[str], constraints: Constraints) -> Progress:
    """Set the parent run RUNNING again and settle the trials the interruption cut short (see the module docstring)."""
    tracker.reopen(search.run_id)
    study = optuna.load_study(study_name=search.study_name, storage=optuna.storages.RDBStorage(search.storage_url))
    children = tracker.trial_runs(experiment_id, search.run_id)
    finished = {  # measured trials, those early stopping ended included; not refined runs
        int(run.data.tags[OPTUNA_TRIAL_TAG]): run
        for run in children
        if (run.info.status == "FINISHED" or run.data.tags.get(STOPPED_TAG) == "true")
        and set(objectives) <= run.data.metrics.keys()
        and OPTUNA_TRIAL_TAG in run.data.tags
    }
    cut_short = set()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        run = finished.get(trial.number)
        if run is not None:
            metrics = run.data.metrics
            annotate(optuna.trial.Trial(study, trial._trial_id), metrics, constraints)  # as the searcher would have
            study.tell(trial.number, [metrics[name] for name in objectives])
        else:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
            cut_short.add(trial.number)
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
    uncompressed baseline), failed ones that were not interrupted."""
    retried = {trial.user_attrs[RETRY_OF] for trial in trials if RETRY_OF in trial.user_attrs}
    state = optuna.trial.TrialState
    return sum(
        (trial.state == state.COMPLETE and not {REPEAT_OF, UNCOMPRESSED} & trial.user_attrs.keys())
        or (trial.state == state.FAIL and trial.number not in retried)
        for trial in trials
    )
