"""The README's main job, run as a user runs it (about 3 minutes on 2 cores with its refinement)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from netshrink.techniques import Pipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # 3.5 minutes: run with -m slow; CI's default run stays under 20 minutes
def test_default_digits_search_finishes_with_a_front(tmp_path):
    shutil.copytree(ROOT / "spaces", tmp_path / "spaces")
    result = subprocess.run(
        [sys.executable, "-m", "netshrink.cli", "search", "spaces/digits.yaml"], capture_output=True, text=True, cwd=tmp_path, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits-lenet5").experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("netshrink.role") == "trial"]
    trials = [r for r in children if "refined_from" not in r.data.tags]
    refined = [r for r in children if "refined_from" in r.data.tags]
    assert len(trials) == 32 and 1 <= len(refined) <= 4  # refine: up to 4 trials with the most to gain
    # no trial failed: each finished, or early stopping ended it (KILLED, tagged stopped_early)
    assert all(r.info.status == "FINISHED" or (r.info.status == "KILLED" and r.data.tags.get("stopped_early") == "true") for r in children)
    assert all(Pipeline.from_recipe(r.data.tags["recipe"]).active_steps() for r in children)  # never the baseline
    assert any(r.data.tags.get("pareto") == "true" for r in children)
