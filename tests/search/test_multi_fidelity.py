"""A search that pays at real cost, end to end through the CLI: MO-ASHA rungs under a time budget, and no dead end
when no trial meets the constraints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import optuna
import pytest
from mlflow.tracking import MlflowClient

BUDGET_MINUTES = 0.5
LADDER = f"""
name: ladder
task:
  dataset_args: {{image_size: 16}}
  train: {{epochs: 3}}
finetune: {{epochs: 3}}
search: {{budget: {{minutes: {BUDGET_MINUTES}}}, max_concurrent: 2, sampler: random, seed: 1, informed_start: false, multi_fidelity: true}}
measure: {{warmup: 5, repeats: 30}}
space:
  pruning: {{granularity: [channel], ratio: {{low: 0.2, high: 0.9}}, steps: 1}}
  quantization: {{bits: [8, 4, 2]}}
"""

NO_WAY = """
name: noway
task:
  dataset_args: {image_size: 16}
  train: {epochs: 3}
finetune: {epochs: 1}
min_metric: 0.9999
search: {trials: 3, max_concurrent: 2, sampler: random, seed: 0, informed_start: false, early_stopping: false}
measure: {warmup: 5, repeats: 30}
space:
  pruning: {granularity: [channel], ratio: {low: 0.3, high: 0.6}, steps: 1}
"""


def netshrink(*args, cwd):
    return subprocess.run([sys.executable, "-m", "netshrink.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def trial_runs(client, name):
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    return [r for r in runs if r.data.tags.get("netshrink.role") == "search"], [r for r in runs if r.data.tags.get("netshrink.role") == "trial"]


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ladder")
    (workdir / "exp.yaml").write_text(textwrap.dedent(LADDER))
    result = netshrink("search", "exp.yaml", cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result, MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def test_rung_decisions_are_logged_and_stopped_trials_end_with_their_rungs_figures(ladder):
    workdir, result, client = ladder
    assert "multi-fidelity: measured after 1, 3 epochs" in result.stdout
    (parent,), trials = trial_runs(client, "ladder")
    stopped = [r for r in trials if r.data.tags.get("stopped_at_rung") == "true"]
    promoted = [r for r in trials if r.data.tags.get("rung_decision", "").startswith("promoted")]
    assert stopped and promoted, [r.data.tags.get("rung_decision") for r in trials]
    for run in stopped:
        assert run.info.status == "FINISHED" and run.data.metrics["rung_epochs"] == 1.0  # a measured model, at its rung
        assert run.data.tags["rung"] == "1 of 2 (1 epoch)" and "artifact_sha256" in run.data.tags
        assert "stopped at rung 1: ranked" in run.data.tags["rung_decision"]
    ran_on = [r for r in promoted if r.data.metrics["rung_epochs"] == 3.0]
    assert ran_on
    history = client.get_metric_history(ran_on[0].info.run_id, "accuracy")
    assert sorted(point.step for point in history) == [1, 3]  # measured at each rung, the same run going on
    assert "stopped at its rung of 1 epoch (MO-ASHA)" in result.stdout
    # Optuna learned from the stopped trials through their rung's figures, flagged as such
    storage = optuna.storages.RDBStorage(f"sqlite:///{workdir / 'optuna.db'}")
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    flagged = [t for t in study.trials if t.user_attrs.get("rung_epochs") == 1.0 and "repeat_of" not in t.user_attrs]  # a repeat is told its original's figures
    assert len(flagged) == len(stopped) and all(t.values for t in flagged)


def test_the_time_budget_stops_starting_trials_and_the_summary_says_where_the_time_went(ladder):
    _, result, client = ladder
    (parent,), trials = trial_runs(client, "ladder")
    assert f"Running trials within {BUDGET_MINUTES:g} min" in result.stdout
    assert "The time budget leaves no room for another trial" in result.stdout
    deadline_ms = parent.info.start_time + BUDGET_MINUTES * 60_000
    assert all(run.info.start_time <= deadline_ms for run in trials)  # no trial started after the budget's end
    assert len(trials) >= 3
    assert "Time: " in result.stdout and "Trials: " in result.stdout and "stopped at rung 1 of 2" in result.stdout
    assert "stopped at rung" in parent.data.tags["time_spent"]


def test_with_no_feasible_trial_front_and_export_show_the_closest_and_what_to_change(tmp_path):
    (tmp_path / "exp.yaml").write_text(textwrap.dedent(NO_WAY))
    searched = netshrink("search", "exp.yaml", cwd=tmp_path)
    assert searched.returncode == 0, searched.stdout[-3000:] + searched.stderr[-3000:]
    assert "No trial meets the constraints" in searched.stdout and "INFEASIBLE" in searched.stdout
    assert "What to change" in searched.stdout and "more fine-tuning: finetune.epochs is 1" in searched.stdout
    assert "min_accuracy 99.99%" in searched.stdout  # each closest trial names the constraint it misses

    listed = netshrink("front", "-e", "noway", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert rows and all(row["feasible"] is False and row["misses"] for row in rows)

    refused = netshrink("export", "-e", "noway", "--pick", "accuracy", "--out", "nope", cwd=tmp_path)
    assert refused.returncode != 0 and rows[0]["run_id"][:8] in refused.stderr + refused.stdout  # names the closest
    assert "Traceback" not in refused.stderr

    exported = netshrink("export", "-e", "noway", "--pick", rows[0]["run_id"][:8], "--out", "closest", cwd=tmp_path)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert "infeasible" in exported.stderr and rows[0]["run_id"] in exported.stdout
    assert "Warning, infeasible" in (tmp_path / "closest" / "MODEL_CARD.md").read_text()
