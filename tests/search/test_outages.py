"""What the user meets on a laptop or a cluster, through the CLI with real Ray, Optuna and MLflow: a tracking server
that goes away for good, a full disk, a deleted Optuna study, two searches started at once, a half-created store.
Each ends in one clear line and a search that can be continued, never in silence, a traceback or a broken store."""

from __future__ import annotations

import errno
import os
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

from tests.search.servers import mlflow_server_process, stop
from tests.search.test_faults import RESUMED, interrupt_after, netshrink, runs_of

QUICK = """
name: {name}
task: {{model: "{model}", dataset_args: {{image_size: 16}}, train: {{epochs: 1}}}}
finetune: {{epochs: {epochs}}}
search: {{trials: {trials}, max_concurrent: 1, sampler: random, seed: 3, early_stopping: false, informed_start: false}}
measure: {{warmup: 1, repeats: 10}}
tracking: {{timeout_s: {timeout}}}
space:
  quantization: {{bits: [16, 8, 4, 2]}}
"""


def quick(name: str, trials: int = 3, epochs: int = 1, timeout: float = 180, model: str = "lenet5") -> str:
    return textwrap.dedent(QUICK.format(name=name, trials=trials, epochs=epochs, timeout=timeout, model=model))


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """A search in its own session (so that what it started can be killed with it), SIGINT as in a terminal."""
    return subprocess.Popen(
        [sys.executable, "-m", "netshrink.cli", *args], cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(text: str, log: Path, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


@pytest.mark.slow  # 45 s: a server, a search, the 20 s bound
def test_a_tracking_server_gone_for_good_stops_the_search_within_the_bound_saying_so(tmp_path):
    (tmp_path / "exp.yaml").write_text(quick("outage", trials=4, epochs=3, timeout=20))
    home = tmp_path / "server"
    home.mkdir()
    with mlflow_server_process(home) as (url, _, server):
        log = tmp_path / "search.log"
        search = start(["search", "exp.yaml", "--tracking-uri", url], tmp_path, log)
        try:
            wait_for("[1/4]", log, search)
            stop(server)  # for good
            killed = time.monotonic()
            search.wait(timeout=20 + 90)  # the bound, plus a trial's own last call and Ray's shutdown
            took = time.monotonic() - killed
        finally:
            if search.poll() is None:
                os.killpg(search.pid, signal.SIGKILL)
    output = log.read_text()
    assert search.returncode == 2 and "Traceback" not in output, output
    assert took < 20 + 60, (took, output)
    assert "unreachable, retrying (attempt 2/" in output, output
    assert "did not answer for 20 s (tracking.timeout_s)" in output and "--resume" in output, output


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB tmpfs to fill, where this process may mount one (root); None elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True).returncode == 0
    yield disk if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# Where no tmpfs can be mounted: a model whose forward pass meets a full disk once the file FULL exists.
DISK_FULL_MODEL = """
import errno, os
from netshrink.tasks.models import lenet5

FLAG = {flag!r}

class Model(type(lenet5(num_classes=10, in_channels=1, image_size=16))):
    def forward(self, x):
        if os.path.exists(FLAG):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/checkpoints/step.bin")
        return super().forward(x)

def make(num_classes, input_shape):
    return Model(num_classes=num_classes, in_channels=input_shape[0], image_size=input_shape[-1])
"""


@pytest.mark.slow  # 61 s; a full disk's one-line message is also checked without a search below
def test_a_full_disk_stops_the_search_in_one_line_without_retrying_and_resume_finishes_it(tmp_path, small_disk):
    workdir = small_disk or tmp_path
    flag = workdir / "FULL"
    model = "lenet5"
    if small_disk is None:
        (workdir / "fullmodel.py").write_text(DISK_FULL_MODEL.format(flag=str(flag)))
        model = "fullmodel:make"
    (workdir / "exp.yaml").write_text(quick("full", trials=3, epochs=2, model=model))
    log = tmp_path / "search.log"
    search = start(["search", "exp.yaml"], workdir, log)
    try:
        wait_for("[1/3]", log, search)
        if small_disk is not None:  # fill it, leaving 250 KB
            free = os.statvfs(workdir).f_bavail * os.statvfs(workdir).f_frsize
            with open(flag, "wb") as filler:
                filler.write(bytes(max(free - 250_000, 0)))
        else:
            flag.write_text("")
        search.wait(timeout=300)
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
    output = log.read_text()
    assert search.returncode == 2 and "Traceback" not in output, output
    assert "the disk is full" in output and "--resume" in output and "running it again" not in output, output
    assert len(output.splitlines()) < 40, output  # not pages of tracebacks
    flag.unlink()
    resumed = netshrink("search", "exp.yaml", "--resume", cwd=workdir)
    # the disk filled during a trial (it runs again) or while the front was written (only that is left to do)
    assert resumed.returncode == 0 and "3 of 3 finished trials (0 failed)" in resumed.stdout, resumed.stdout + resumed.stderr
    _, (parent,), children = runs_of(workdir, "full")
    assert parent.info.status == "FINISHED" and sum(c.info.status == "FINISHED" for c in children) == 3


@pytest.mark.slow  # 60 s: a search killed part-way, then resumed
def test_a_deleted_optuna_study_is_rebuilt_from_the_mlflow_runs_and_the_search_finishes(tmp_path):
    (tmp_path / "exp.yaml").write_text(textwrap.dedent(RESUMED))
    interrupt_after(tmp_path, finished=2, sig=signal.SIGKILL)
    _, (parent,), before = runs_of(tmp_path, "resumed")
    done_before = {c.info.run_id: c.info.end_time for c in before if c.info.status == "FINISHED"}
    (tmp_path / "optuna.db").unlink()
    unknown = netshrink("search", "exp.yaml", "--resume", "0" * 32, cwd=tmp_path)
    assert unknown.returncode == 2 and "no MLflow run has the id" in unknown.stderr and "Traceback" not in unknown.stderr, unknown.stderr
    assert not (tmp_path / "optuna.db").exists()  # nothing created by a refused resume
    resumed = netshrink("search", "exp.yaml", "--resume", parent.info.run_id, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Rebuilt it from the search's MLflow runs: 2 measured trial(s), 0 failed, 1 cut short" in resumed.stdout, resumed.stdout
    assert "Resuming: 2 of 4 trials were done" in resumed.stdout and "[4/4]" in resumed.stdout, resumed.stdout
    _, (parent,), after = runs_of(tmp_path, "resumed")
    finished = {c.info.run_id: c.info.end_time for c in after if c.info.status == "FINISHED"}
    assert parent.info.status == "FINISHED" and len(finished) == 4
    assert all(finished[run_id] == end for run_id, end in done_before.items())  # not run again
    study = optuna.load_study(study_name=parent.data.tags["optuna.study_name"], storage=parent.data.tags["optuna.storage"])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "repeat_of" not in t.user_attrs]
    assert len(complete) == 4 and sum("rebuilt_from" in t.user_attrs for t in complete) == 3  # 2 told, the cut one rerun


def test_abandon_marks_a_stale_search_ended_so_that_resume_passes_it_by(tmp_path, monkeypatch):
    from netshrink.errors import UserError
    from netshrink.search.runner import abandon_search, run_search
    from netshrink.validation import load_experiment

    monkeypatch.chdir(tmp_path)  # in process: the CLI's --resume and --abandon reach these two calls (the rebuild test runs them as commands)
    (tmp_path / "exp.yaml").write_text(quick("stale"))
    experiment = load_experiment(tmp_path / "exp.yaml")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("stale", artifact_location=(tmp_path / "mlartifacts").as_uri())
    stale = client.create_run(experiment_id, tags={"netshrink.role": "search"}).info.run_id  # RUNNING, its driver long gone
    trial = client.create_run(experiment_id, tags={"netshrink.role": "trial", "mlflow.parentRunId": stale}).info.run_id
    abandon_search(experiment, tmp_path / "exp.yaml", stale)
    assert client.get_run(stale).info.status == "KILLED" and client.get_run(trial).info.status == "KILLED"
    assert client.get_run(stale).data.tags["netshrink.abandoned"] == "true"
    for resume, expected in (("latest", "no interrupted search"), (stale, "was abandoned"), ("0" * 32, "no MLflow run has the id")):
        with pytest.raises(UserError, match=expected):  # before anything is trained
            run_search(experiment, tmp_path / "exp.yaml", resume=resume)
    with pytest.raises(UserError, match="no MLflow run has the id"):
        abandon_search(experiment, tmp_path / "exp.yaml", "0" * 32)
    assert not (tmp_path / ".netshrink" / "baselines").exists()


@pytest.mark.slow  # 30 s: two searches on two cores
def test_two_searches_started_at_once_in_a_new_folder_both_finish_on_one_baseline(tmp_path):
    (tmp_path / "exp.yaml").write_text(quick("together", trials=2))
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    searches = [start(["search", "exp.yaml"], tmp_path, log) for log in logs]
    try:
        for search in searches:
            search.wait(timeout=600)
    finally:
        for search in searches:
            if search.poll() is None:
                os.killpg(search.pid, signal.SIGKILL)
    outputs = [log.read_text() for log in logs]
    assert [search.returncode for search in searches] == [0, 0], outputs
    assert sum("Training the baseline" in output for output in outputs) == 1, outputs  # the second used the first's
    assert sum("Using the cached baseline" in output for output in outputs) == 1, outputs
    _, parents, children = runs_of(tmp_path, "together")
    assert [p.info.status for p in parents] == ["FINISHED"] * 2 and len(children) == 4


def test_a_half_created_store_is_reported_with_what_to_do(tmp_path):
    store = tmp_path / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{store}").search_experiments()  # created, then broken as a cut-short creation leaves it
    with sqlite3.connect(store) as connection:
        connection.execute("drop table alembic_version")
        connection.execute("drop table secrets")
    (tmp_path / "exp.yaml").write_text(quick("half"))
    result = netshrink("search", "exp.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "half-created" in result.stderr and f"rm {store}" in result.stderr, result.stderr


def test_a_full_disk_reads_as_one_line_naming_the_path():
    from netshrink.errors import disk_full

    assert disk_full(OSError(errno.ENOSPC, "No space left on device", "/data/x.bin")) == "the disk is full: no space left on device writing /data/x.bin"
    wrapped = RuntimeError("API call failed")
    wrapped.__cause__ = sqlite3.OperationalError("database or disk is full")
    assert disk_full(wrapped) == "the disk is full: database or disk is full"
    assert disk_full(ValueError("a bad shape")) is None


def test_a_knob_logged_as_text_reads_back_in_its_type():
    from netshrink.search.resume import parse_param

    assert [parse_param(text) for text in ("0.35", "4", "True", "channel", "None", "1e-05")] == [0.35, 4, True, "channel", None, 1e-05]
