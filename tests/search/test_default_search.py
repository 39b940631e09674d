"""The README's main job, run as a user runs it (about 70 s on 2 cores; it was `slow` until trials reused their worker processes)."""

import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]


def test_default_digits_search_finishes_with_a_front(tmp_path):
    shutil.copytree(ROOT / "spaces", tmp_path / "spaces")
    result = subprocess.run(
        [sys.executable, "-m", "netshrink.cli", "search", "spaces/digits.yaml"], capture_output=True, text=True, cwd=tmp_path, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits-lenet5").experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("netshrink.role") == "trial"]
    assert len(children) == 32
    assert any(r.data.tags.get("pareto") == "true" for r in children)
