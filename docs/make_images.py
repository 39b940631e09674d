"""Make the docs' pictures again, from a fresh run of the default search: the Pareto plot of the worked example
(``docs/images/front.png``) and the MLflow UI with the front's columns (``docs/images/mlflow-ui.png``), taken with
headless Chromium (``apt-get install chromium``). Nothing is drawn by hand.

    .venv/bin/python docs/make_images.py                     # a fresh search in a temporary folder (about 3 minutes)
    .venv/bin/python docs/make_images.py --workdir /tmp/ex   # reuse a folder where the search already ran

The search's printed output is kept as ``search-output.txt`` in the working folder, for the docs' worked example.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
EXPERIMENT = "digits-lenet5"
SHARE_KEY = "netshrink-front"  # an MLflow shared view: the UI reads its columns and filter from this experiment tag
COLUMNS = [  # MLflow's canonical column keys: type.`name`
    "tags.`pareto`", "metrics.`accuracy`", "metrics.`test_accuracy`", "metrics.`size_bytes`", "metrics.`size_ratio`",
    "metrics.`latency_ms`", "metrics.`speedup`", "params.`recipe`",
]


def netshrink(args: list[str], cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"netshrink {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def fresh_search(workdir: Path) -> None:
    if (workdir / "mlflow.db").is_file():
        print(f"Reusing the search in {workdir}")
        return
    shutil.copy(ROOT / "spaces" / "digits.yaml", workdir / "digits.yaml")
    shutil.copy(ROOT / "spaces" / "experiment.schema.json", workdir / "experiment.schema.json")
    print(f"Running the default search in {workdir} (about 3 minutes) ...", flush=True)
    output = netshrink(["search", "digits.yaml"], workdir)
    (workdir / "search-output.txt").write_text(output)


def front_plot(workdir: Path) -> None:
    netshrink(["front", "--experiment", EXPERIMENT, "--plot", "plots"], workdir)
    shutil.copy(workdir / "plots" / "pareto.png", IMAGES / "front.png")
    print(f"Wrote {IMAGES / 'front.png'}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def share_front_view(workdir: Path) -> str:
    """Save an MLflow shared view of the experiment: the front's trials (``tags.pareto = "true"``) with the columns
    a user adds by hand; returns the experiment id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    view = {"searchFilter": 'tags.pareto = "true"', "orderByKey": "metrics.`size_bytes`", "orderByAsc": True, "selectedColumns": COLUMNS}
    client.set_experiment_tag(experiment.experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(view))
    return experiment.experiment_id


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("headless Chromium is needed for the MLflow UI's screenshot: apt-get install chromium")


def mlflow_screenshot(workdir: Path) -> None:
    experiment_id = share_front_view(workdir)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            sys.exit("the MLflow server did not start")
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?viewStateShareKey={SHARE_KEY}"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
                 "--window-size=2400,700", "--virtual-time-budget=20000", f"--screenshot={IMAGES / 'mlflow-ui.png'}", url],
                check=True, capture_output=True, timeout=180,
            )
        print(f"Wrote {IMAGES / 'mlflow-ui.png'} (from {url})")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the search runs (default: a new temporary folder); reused if it holds one")
    args = parser.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="netshrink-docs-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    IMAGES.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    fresh_search(workdir)
    front_plot(workdir)
    mlflow_screenshot(workdir)


if __name__ == "__main__":
    main()
