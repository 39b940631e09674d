"""Long work shows that it moves: lines within long epochs, and each running trial's last line on the search's console."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from netshrink.deploy.evaluate import step_line
from netshrink.search import progress
from netshrink.search.tracking import Tracker
from netshrink.search.tracking import PROGRESS_TAG
from netshrink.search.trial import log_progress


def test_a_line_every_30_seconds_within_epochs_with_the_time_to_go():
    lines: list[str] = []
    report = step_line("baseline training", lines.append)
    for step, seconds in ((1, 5.0), (2, 31.0), (3, 45.0), (4, 62.0)):  # 100 steps in 2 epochs
        report(1, 2, step, 50, seconds)
    assert lines == [
        "baseline training: epoch 1/2, step 2/50 (2%), 31 s, about 1519 s to go",
        "baseline training: epoch 1/2, step 4/50 (4%), 62 s, about 1488 s to go",
    ]


def test_the_search_prints_each_running_trials_last_progress_line_once(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("progress")
    parent = client.create_run(experiment, run_name="search").info.run_id
    running = tracker.start_trial(experiment, parent, run_name="trial-003", tags={})
    finished = tracker.start_trial(experiment, parent, run_name="trial-001", tags={})
    tracker.finish(finished)
    log_progress(tracker, running, "fine-tuning round 1/1: epoch 1/3, step 40/170 (8%), 95 s, about 1090 s to go")
    client.set_tag(finished, PROGRESS_TAG, "an old line of a trial that ended")
    monkeypatch.setattr(progress, "RUNNING_EVERY", 0.0)
    watch = progress.RunningTrials(uri, experiment, parent)
    watch.check()
    watch.check()  # the same line is not printed twice
    assert capsys.readouterr().out == "  trial-003: fine-tuning round 1/1: epoch 1/3, step 40/170 (8%), 95 s, about 1090 s to go\n"
