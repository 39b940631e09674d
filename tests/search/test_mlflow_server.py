"""A real ``mlflow server`` over HTTP: a small search logs to it through the CLI, checked through the REST API.

The checks speak plain HTTP, not ``MlflowClient``, so they see what the server holds and nothing a
client-side fallback could have written to a local store.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import optuna
import pytest

from tests.search.servers import api, artifact_files, download, metrics, mlflow_server, tags
from tests.models import applied_agrees_with_sampled

TRIALS = 3
EXPERIMENT = f"""
name: remote
task: {{dataset_args: {{image_size: 16}}, train: {{epochs: 2}}}}
finetune: {{epochs: 1}}
search: {{trials: {TRIALS}, max_concurrent: 2, sampler: random, seed: 3}}
measure: {{warmup: 5, repeats: 100}}
space:
  pruning: {{ratio: {{low: 0.3, high: 0.8}}}}
  quantization: {{bits: [16, 8]}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with its own SQLite store and proxied artifact folder; always stopped."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


@pytest.fixture(scope="module")
def finished_search(server, tmp_path_factory):
    url, artifacts = server
    workdir = tmp_path_factory.mktemp("remote-search")
    (workdir / "exp.yaml").write_text(textwrap.dedent(EXPERIMENT))
    command = [sys.executable, "-m", "netshrink.cli", "search", "exp.yaml", "--tracking-uri", url]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    experiment = api(url, "experiments/get-by-name", experiment_name="remote")["experiment"]
    runs = api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    parents = [r for r in runs if tags(r).get("netshrink.role") == "search"]
    children = [r for r in runs if tags(r).get("netshrink.role") == "trial"]
    return workdir, artifacts, url, experiment, parents, children


def test_the_experiment_keeps_its_artifacts_on_the_server(finished_search):
    _, artifacts, _, experiment, _, _ = finished_search
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # proxied, not a path on the client
    assert any(artifacts.rglob("compressed.safetensors"))


def test_parent_run_holds_the_baseline_the_config_and_the_front(finished_search):
    _, _, url, _, parents, children = finished_search
    (parent,) = parents
    assert parent["info"]["status"] == "FINISHED"
    values = metrics(parent)
    for key in ("baseline_accuracy", "baseline_size_bytes", "baseline_latency_ms"):
        assert values[key] > 0
    assert values["trials_finished"] == TRIALS
    files = artifact_files(url, parent)
    assert {"experiment.yaml", "front.json"} <= files.keys()
    assert download(url, parent, "experiment.yaml").decode() == textwrap.dedent(EXPERIMENT)
    front = download(url, parent, "front.json")
    assert len(front) == files["front.json"]
    assert {row["run_id"] for row in json.loads(front)} == {c["info"]["run_id"] for c in children if tags(c)["pareto"] == "true"}


def test_one_child_run_per_trial_with_metrics_tags_and_artifacts(finished_search):
    _, _, url, _, parents, children = finished_search
    assert len(children) == TRIALS
    for child in children:
        assert child["info"]["status"] == "FINISHED"
        child_tags = tags(child)
        assert child_tags["mlflow.parentRunId"] == parents[0]["info"]["run_id"]
        assert child_tags["recipe"] and child_tags["recipe_summary"]
        values = metrics(child)
        for key in ("accuracy", "size_bytes", "latency_ms", "size_ratio", "speedup", "onnx_accuracy"):
            assert key in values, key
        files = artifact_files(url, child)
        assert {"compressed.safetensors", "recipe.json"} <= files.keys()
        # size_bytes is the size of the file the server now holds
        assert files["compressed.safetensors"] == values["size_bytes"]
        assert len(download(url, child, "compressed.safetensors")) == values["size_bytes"]
        assert applied_agrees_with_sampled(json.loads(download(url, child, "recipe.json")), json.loads(child_tags["recipe"]))


def test_pareto_tags_mark_exactly_optunas_front(finished_search):
    workdir, _, _, _, parents, children = finished_search
    parent_tags = tags(parents[0])
    study = optuna.load_study(study_name=parent_tags["optuna.study_name"], storage=parent_tags["optuna.storage"])
    best = {t.user_attrs.get("repeat_of", t.number) for t in study.best_trials if "uncompressed" not in t.user_attrs}  # a repeat stands for its original; the baseline has no child run
    assert best and {int(tags(c)["optuna_trial"]) for c in children if tags(c)["pareto"] == "true"} == best
    assert all(tags(c)["pareto"] in {"true", "false"} for c in children)


def _export(workdir, url, out, *extra):
    command = [sys.executable, "-m", "netshrink.cli", "export", "-e", "remote", "--pick", "accuracy", "--out", out, "--tracking-uri", url, *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=workdir, timeout=300)


def test_export_from_a_server_runs_only_code_from_a_local_file_that_matches_the_logged_one(finished_search):
    workdir, _, url, _, parents, _ = finished_search
    assert tags(parents[0])["config_sha256"] == hashlib.sha256(textwrap.dedent(EXPERIMENT).encode()).hexdigest()
    refused = _export(workdir, url, "out-refused")
    assert refused.returncode == 2 and "--config FILE" in refused.stderr and "--trust-logged-code" in refused.stderr
    assert "Traceback" not in refused.stderr and not (workdir / "out-refused").exists()
    (workdir / "changed.yaml").write_text(textwrap.dedent(EXPERIMENT).replace("epochs: 2", "epochs: 3"))
    changed = _export(workdir, url, "out-changed", "--config", "changed.yaml")
    assert changed.returncode == 2 and "is not the experiment file search" in changed.stderr and "Traceback" not in changed.stderr
    for out, extra in (("out-local", ["--config", "exp.yaml"]), ("out-trusted", ["--trust-logged-code"])):
        result = _export(workdir, url, out, *extra)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (workdir / out / "model.onnx").is_file()


def test_nothing_was_tracked_in_the_working_directory(finished_search):
    workdir = finished_search[0]
    local = [path for name in ("mlflow.db", "mlruns", "mlartifacts") for path in workdir.rglob(name)]
    assert not local, local


def test_the_optuna_study_stays_with_the_driver_and_matches_the_runs(finished_search):
    """A remote tracking URI has no folder to put the study next to: it goes to .netshrink/ of the working dir."""
    workdir, _, _, _, parents, children = finished_search
    parent_tags = tags(parents[0])
    assert parent_tags["optuna.storage"] == f"sqlite:///{(workdir / '.netshrink' / 'optuna.db').resolve()}"
    study = optuna.load_study(study_name=parent_tags["optuna.study_name"], storage=parent_tags["optuna.storage"])
    complete = {t.number: t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "repeat_of" not in t.user_attrs}
    assert len(complete) == TRIALS
    for child in children:
        values = metrics(child)
        assert complete[int(tags(child)["optuna_trial"])].values == pytest.approx([values["accuracy"], values["size_bytes"], values["latency_ms"]])
