"""Faults cost a trial at most, never the search: real Ray, Optuna and SQLite MLflow through the CLI.

- a trial that produces NaN is failed in Tune, in the Optuna study and in MLflow; the others go on;
- a trial whose worker process is killed runs again and the search completes;
- a driver stopped by Ctrl-C or SIGKILL is continued with ``--resume``: same parent run, same
  study, no finished trial run again or lost, the budgeted number of trials in the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

USERLAND = Path(__file__).parent / "userland"
State = optuna.trial.TrialState


def netshrink(*args, cwd):
    return subprocess.run([sys.executable, "-m", "netshrink.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900)


def runs_of(workdir: Path, name: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("netshrink.role") == "search"]
    children = [r for r in runs if r.data.tags.get("netshrink.role") == "trial"]
    return client, parents, children


def study_of(parent) -> optuna.Study:
    return optuna.load_study(study_name=parent.data.tags["optuna.study_name"], storage=parent.data.tags["optuna.storage"])


def tune_trials(workdir: Path):
    """Tune's own record of the trials, read back from the experiment folder it wrote."""
    from ray.tune import ExperimentAnalysis

    (run,) = [path for path in (workdir / ".netshrink" / "ray").iterdir() if path.is_dir()]
    return ExperimentAnalysis(str(run)).trials


def test_a_nan_trial_is_failed_in_tune_optuna_and_mlflow_and_the_search_goes_on(tmp_path):
    shutil.copy(USERLAND / "nan_when_pruned.py", tmp_path / "nan_when_pruned.py")
    (tmp_path / "exp.yaml").write_text(
        textwrap.dedent(
            """
            name: nan
            task: {model: "nan_when_pruned:make", dataset_args: {image_size: 8}, train: {epochs: 1}, allow_weak_baseline: true}
            finetune: {epochs: 1}
            search: {trials: 4, max_concurrent: 2, sampler: random, seed: 1, max_failures: 1}
            measure: {warmup: 1, repeats: 10}
            space:
              pruning: {enabled: true, granularity: [weight, channel], steps: 1}
            """
        )
    )
    result = netshrink("search", "exp.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    _, (parent,), children = runs_of(tmp_path, "nan")
    assert len(children) == 4  # a retried trial carries on in its own run: one child per trial
    failed = [c for c in children if c.info.status == "FAILED"]
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert failed and finished, "the seed should draw both granularities"
    assert all('"channel"' in c.data.tags["recipe"] and "FloatingPointError" in c.data.tags["error"] for c in failed)
    assert all('"weight"' in c.data.tags["recipe"] and "error" not in c.data.tags for c in finished)
    # max_failures: 1 -> each failing trial ran twice before it counted as failed
    assert result.stdout.count("running it again") == len(failed)
    assert result.stdout.count("trial failed:") == len(failed)
    assert parent.data.metrics["trials_failed"] == len(failed) and parent.data.metrics["trials_finished"] == len(finished)

    states = {t.number: t.state for t in study_of(parent).trials if "repeat_of" not in t.user_attrs}
    by_number = {int(c.data.tags["optuna_trial"]): c.info.status for c in children}
    assert {number: states[number] for number in by_number} == {
        number: State.COMPLETE if status == "FINISHED" else State.FAIL for number, status in by_number.items()
    }
    tune = {t.config["optuna_trial"]: t for t in tune_trials(tmp_path)}
    assert {number: tune[number].status for number in by_number} == {
        number: "TERMINATED" if status == "FINISHED" else "ERROR" for number, status in by_number.items()
    }
    assert all(tune[int(c.data.tags["optuna_trial"])].num_failures == 2 for c in failed)


@pytest.mark.slow  # 35 s; the default run keeps a retried NaN trial and a killed search
def test_a_killed_worker_process_costs_one_retry_and_the_search_completes(tmp_path):
    shutil.copy(USERLAND / "dies_once.py", tmp_path / "dies_once.py")
    (tmp_path / "exp.yaml").write_text(
        textwrap.dedent(
            """
            name: dies
            task: {model: "dies_once:make", dataset_args: {image_size: 16}, train: {epochs: 1}}
            finetune: {epochs: 1}
            search: {trials: 3, max_concurrent: 1, sampler: random, seed: 0}
            measure: {warmup: 1, repeats: 10}
            space:
              quantization: {enabled: true, bits: [16, 8, 4]}
            """
        )
    )
    result = netshrink("search", "exp.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "killed-a-worker").exists()  # the first trial's worker really was SIGKILLed
    assert result.stdout.count("running it again") == 1 and "trial failed:" not in result.stdout
    _, (parent,), children = runs_of(tmp_path, "dies")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 3
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert [t.state for t in study_of(parent).trials if "repeat_of" not in t.user_attrs] == [State.COMPLETE] * 3
    assert sorted(t.num_failures for t in tune_trials(tmp_path)) == [0, 0, 1]


RESUMED_TRIALS = 4
RESUMED = f"""
name: resumed
task: {{dataset_args: {{image_size: 16}}, train: {{epochs: 1}}}}
finetune: {{epochs: 12}}  # a trial long enough to be interrupted in the middle
# early stopping off: on this 1-epoch baseline a 2-bit trial can be stopped as hopeless, and the test counts finished trials
search: {{trials: {RESUMED_TRIALS}, max_concurrent: 1, sampler: random, seed: 5, early_stopping: false, multi_fidelity: false}}
measure: {{warmup: 1, repeats: 10}}
space:
  pruning: {{ratio: {{low: 0.2, high: 0.8}}}}
  quantization: {{bits: [16, 8, 4, 2]}}
"""


def running_runs(database: Path) -> int:
    with sqlite3.connect(database, timeout=30) as connection:
        return connection.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]


def interrupt_after(workdir: Path, finished: int, sig: int) -> str:
    """Start a search, hit it with ``sig`` once ``finished`` trials are done, return its output.

    The signal goes as soon as the next trial's MLflow run exists, so that trial is cut short.
    SIGINT goes to the driver's process group, as a terminal's Ctrl-C does; SIGKILL to every
    process of its session, the local Ray it started included, as when the machine is lost
    (Ray gives each worker a process group of its own, so a group kill would leave the trial
    running: it would finish on its own and the test would not see an interrupted trial).
    """
    log = workdir / "first.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "netshrink.cli", "search", "exp.yaml"],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # as in a terminal: a shell script's background job (CI runners) inherits SIGINT ignored,
            # and Python then never raises KeyboardInterrupt
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 600
            while f"[{finished}/{RESUMED_TRIALS}]" not in log.read_text() or running_runs(workdir / "mlflow.db") < 2:  # parent + next trial
                assert driver.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            if sig == signal.SIGINT:
                os.killpg(driver.pid, signal.SIGINT)
                driver.wait(timeout=120)
            else:
                kill_session(driver.pid)
        finally:
            kill_session(driver.pid)  # whatever is left (nothing, after a clean Ctrl-C)
            driver.wait(timeout=60)
    return log.read_text()


def kill_session(session: int) -> None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.mark.parametrize(
    "sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGKILL], ids=["ctrl-c", "sigkill"]
)  # ctrl-c (65 s) runs with -m slow; the default run keeps the harder case, a killed search
def test_resume_continues_an_interrupted_search_without_rerunning_or_losing_trials(tmp_path, sig):
    (tmp_path / "exp.yaml").write_text(textwrap.dedent(RESUMED))
    first = interrupt_after(tmp_path, finished=2, sig=sig)
    if sig == signal.SIGINT:
        assert "--resume" in first and "Traceback" not in first, first
    client, (parent,), before = runs_of(tmp_path, "resumed")
    done_before = {c.info.run_id: c for c in before if c.info.status == "FINISHED"}
    assert len(done_before) == 2, [(c.info.status, c.data.tags.get("optuna_trial")) for c in before]

    resumed = netshrink("search", "exp.yaml", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming: 2 of 4 trials were done" in resumed.stdout, resumed.stdout
    assert f"[{RESUMED_TRIALS}/{RESUMED_TRIALS}]" in resumed.stdout

    _, parents, after = runs_of(tmp_path, "resumed")
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # continued, not duplicated
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == RESUMED_TRIALS
    finished = [c for c in after if c.info.status == "FINISHED"]
    assert len(finished) == RESUMED_TRIALS
    for run in finished:  # the trials finished before the interruption were not run again
        if run.info.run_id in done_before:
            assert run.info.end_time == done_before[run.info.run_id].info.end_time
    assert done_before.keys() <= {run.info.run_id for run in finished}
    assert all(c.info.status in ("FINISHED", "KILLED") for c in after)  # the interrupted attempt: KILLED, run again
    assert len({c.data.tags["recipe"] for c in finished}) == RESUMED_TRIALS

    (study,) = optuna.get_all_study_summaries(storage=parent.data.tags["optuna.storage"])
    trials = study_of(parent).trials
    assert study.study_name == parent.data.tags["optuna.study_name"]
    complete = [t for t in trials if t.state == State.COMPLETE and "repeat_of" not in t.user_attrs]
    assert len(complete) == RESUMED_TRIALS
    assert {t.number for t in complete} == {int(c.data.tags["optuna_trial"]) for c in finished}
    moved = {t.user_attrs["requeued_of"] for t in trials if "requeued_of" in t.user_attrs}  # waiting trials put behind the rerun
    interrupted = [t for t in trials if t.state == State.FAIL and t.number not in moved]
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert [t.user_attrs["retry_of"] for t in retries] == [t.number for t in interrupted]
    assert all(t.params == next(i for i in interrupted if i.number == t.user_attrs["retry_of"]).params for t in retries)
    assert not [t for t in trials if t.state == State.RUNNING]
    # the cut pipeline ran again, within the budget, and is on the resumed search's front
    (retry,) = retries
    assert retry.state == State.COMPLETE
    (rerun,) = [c for c in finished if c.data.tags["optuna_trial"] == str(retry.number)]
    front = json.loads(netshrink("front", "-e", "resumed", "--json", cwd=tmp_path).stdout)
    assert rerun.info.run_id in {point["run_id"] for point in front}, (rerun.data.tags["recipe_summary"], front)


@pytest.mark.slow  # 33 s; "nothing to resume" is also in test_outages.py's --abandon test
def test_resume_refuses_clearly_when_there_is_nothing_to_resume_or_the_file_changed(tmp_path):
    (tmp_path / "exp.yaml").write_text(textwrap.dedent(RESUMED))
    nothing = netshrink("search", "exp.yaml", "--resume", cwd=tmp_path)
    assert nothing.returncode == 2 and "--resume" in nothing.stderr and "no interrupted search" in nothing.stderr, nothing.stderr
    assert "Traceback" not in nothing.stderr
    interrupt_after(tmp_path, finished=1, sig=signal.SIGKILL)
    (tmp_path / "exp.yaml").write_text(textwrap.dedent(RESUMED).replace("epochs: 12", "epochs: 2"))
    changed = netshrink("search", "exp.yaml", "--resume", cwd=tmp_path)
    assert changed.returncode == 2 and "has changed since search" in changed.stderr and "Traceback" not in changed.stderr


class NoRuns:
    """The MLflow side of a search that has no child runs yet: ``reopen_search`` only reads and marks runs."""

    def reopen(self, run_id):
        pass

    def trial_runs(self, experiment_id, parent_run_id):
        return []

    def interrupted(self, run_id):
        pass


def test_the_cut_trial_runs_again_before_the_trials_that_waited_in_the_queue(tmp_path):
    from netshrink.search.resume import reopen_search
    from netshrink.search.tracking import SearchRecord

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    for x in (1, 2, 3, 4):  # the informed start: enqueued when the search began
        study.enqueue_trial({"x": x})
    done = study.ask()
    done.suggest_int("x", 0, 9)
    study.tell(done, [0.9, 1.0])
    cut = study.ask()
    assert cut.suggest_int("x", 0, 9) == 2  # running when the search was stopped; 3 and 4 still wait
    record = SearchRecord(
        run_id="p", objectives=["accuracy", "size_bytes"], constraints=None, baseline={}, study_name="s", storage_url=storage,
        config_file=None, config_sha256=None, trials=4,
    )
    progress = reopen_search(NoRuns(), "0", record, record.objectives, None)
    assert progress.ended == 1  # the cut trial and the moved ones cost no budget
    order = []
    for _ in range(3):
        trial = study.ask()
        order.append(trial.suggest_int("x", 0, 9))
        study.tell(trial, [0.5, 1.0])
    assert order == [2, 3, 4]
    trials = study.get_trials()
    assert [t.user_attrs.get("retry_of") for t in trials if "retry_of" in t.user_attrs] == [cut.number]
    assert sorted(t.user_attrs["requeued_of"] for t in trials if "requeued_of" in t.user_attrs) == [2, 3]
    from netshrink.search.resume import ended_trials

    assert ended_trials(trials) == 4
