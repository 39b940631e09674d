"""refine: after the search, the front's chosen points are fine-tuned longer, each a child run of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient

EXPERIMENT = """
name: refine
task: {dataset_args: {image_size: 16}, train: {epochs: 2}}
finetune: {epochs: 1}
refine: {epochs: 3, points: knee, count: 2}
search: {trials: 4, max_concurrent: 2, sampler: random, seed: 3}
measure: {warmup: 5, repeats: 50}
space:
  pruning: {granularity: channel, ratio: {low: 0.3, high: 0.8}, steps: 2}
  quantization: {bits: [16, 8]}
"""


@pytest.fixture(scope="module")
def refined_search(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("refine")
    (workdir / "exp.yaml").write_text(textwrap.dedent(EXPERIMENT))
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "search", "exp.yaml"], capture_output=True, text=True, cwd=workdir, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("refine").experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags.get("netshrink.role") == "trial"]
    return workdir, result, client, children


def test_the_points_nearest_the_knee_are_refined_as_their_own_runs(refined_search):
    _, result, _, children = refined_search
    trials = {c.info.run_id: c for c in children if "refined_from" not in c.data.tags}
    refined = [c for c in children if "refined_from" in c.data.tags]
    assert len(trials) == 4 and len(refined) == 2 and "Refining 2 front point(s)" in result.stdout
    for run in refined:
        origin = trials[run.data.tags["refined_from"]]
        assert run.info.status == "FINISHED" and run.info.run_name == f"{origin.info.run_name}-refined"
        assert run.data.tags["recipe"] == origin.data.tags["recipe"] and "optuna_trial" not in run.data.tags
        assert run.data.params["refine/epochs"] == "3"
        assert {"accuracy", "test_accuracy", "size_bytes", "latency_ms"} <= run.data.metrics.keys()
        # 3 epochs of fine-tuning instead of 1 (between the pruning steps too): another model from the same recipe
        assert run.data.metrics["accuracy"] != origin.data.metrics["accuracy"] or run.data.metrics["size_bytes"] != origin.data.metrics["size_bytes"]


def test_the_front_is_taken_over_trials_and_refined_runs_and_export_can_pick_a_refined_run(refined_search, tmp_path):
    from netshrink.search.front import TrialPoint, pareto_front

    workdir, _, _, children = refined_search
    points = [TrialPoint(c.info.run_id, c.info.run_name, c.data.metrics["accuracy"], c.data.metrics["size_bytes"], c.data.metrics["latency_ms"], "{}", "") for c in children]
    assert {c.info.run_id for c in children if c.data.tags["pareto"] == "true"} == {p.run_id for p in pareto_front(points, ["accuracy", "size_bytes", "latency_ms"], ["max", "min", "min"])}
    refined = next(c for c in children if "refined_from" in c.data.tags)
    out = tmp_path / "shipped"
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "export", "-e", "refine", "--pick", refined.info.run_id, "--out", str(out)],
                            capture_output=True, text=True, cwd=workdir, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "model.onnx").is_file() and f"{refined.data.metrics['accuracy']:.2%}" in result.stdout
