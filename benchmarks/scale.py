"""Scale benchmark: trials per hour at concurrency 1 and 2, and where a trial's time goes.

Runs the real product as a user does: ``python -m netshrink.cli search EXPERIMENT
--trials N --concurrency C`` in a subprocess, on a local Ray, with MLflow in a
SQLite file, once per concurrency, each in its own fresh working directory. The
baseline is trained by the first search only: its cache (``.netshrink/baselines``)
is copied into the next working directory, and the script stops with an error if
a later search trains it again. A benchmark, not a test: it prints figures and
asserts nothing about them. On a busy machine the figures are disturbed.

    .venv/bin/python benchmarks/scale.py                  # 16 trials at concurrency 1, then at 2
    .venv/bin/python benchmarks/scale.py --trials 2       # a quick check that it works end to end
    .venv/bin/python benchmarks/scale.py --json scale.json --keep /tmp/scale

The experiment (unless ``--experiment`` names another file) is the built-in task
(LeNet-5 on scikit-learn's digits at 28x28, baseline 30 epochs), every technique
with its default knob ranges (the shipped spaces/digits.yaml space), 3 epochs of
fine-tuning per trial, NSGA-II with seed 0, default latency settings.

What is measured, and how
-------------------------
Trial phase (wall seconds)
    Stamped in this script from the search's own output, read line by line as it
    is printed: from the line "Running N trials, C at a time" (printed after the
    baseline and the MLflow parent run, right before Ray Tune starts) to the last
    per-trial progress line "[k/N] ..." (printed by a Tune callback in the driver
    when a trial's result arrives). So it excludes Ray start-up, baseline
    training or loading, and the Pareto front and plots written afterwards; it
    includes everything Ray does for the trials, the first worker's start included.
Trials per hour
    Finished trials / trial phase x 3600. Failed trials are not counted, but their
    time stays in the phase; the table shows them.
Mean trial in the worker
    Mean of the trials' ``seconds_trial`` metric: wall time of the trial function
    inside its Ray worker, from its first line to just before the last metric
    upload (MLflow logs it per child run; see netshrink/search/trial.py).
Slot time
    Concurrency x trial phase: the trial time the search had; per trial, divided
    by the finished trials. It is split into the parts below, each a sum over the
    finished trials, printed per trial and as a share of the slot time; the parts
    add up to the slot time:
      training      sum of ``seconds_training`` (compression and fine-tuning)
      evaluation    sum of ``seconds_evaluation`` (accuracy in torch on validation
                    and test, and in ONNX Runtime on validation)
      latency       sum of ``seconds_latency`` (the ONNX Runtime latency measurement,
                    trial model and baseline in alternation)
      mlflow+export sum of (``seconds_trial`` - training - latency - evaluation) plus
                    the trial's last MLflow calls (metrics upload and run end: the
                    child run's end time minus the timestamp of its metrics): in the
                    worker but outside the three above: MLflow client and logging,
                    artifact save and reload, ONNX export, loading data and baseline
      ray           the remainder: slot time minus all the other parts. Ray handing
                    the trial to a worker process (Tune reuses them; a new one imports
                    torch, MLflow and netshrink anew) with its setup, Tune scheduling,
                    Optuna sampling in the driver, the result travelling back
      idle          after the last trial has started, slot time in which no trial's
                    MLflow run is open, up to the end of the last run (nothing is left
                    to schedule, a slot waits for the last trial); 0 at concurrency 1
    Outside training and evaluation = 100% - training - evaluation, i.e.
    latency + mlflow+export + ray + idle.
    Note: "ray" is the remainder, not a direct measurement; slot time in which a
    trial that later failed ran also lands there. Training and evaluation include
    waits at the machine-wide compute lock while a neighbour measures latency
    (netshrink.node_lock), as they would in a user's run.
Whole command
    Wall time of the ``netshrink search`` process: Ray start-up, baseline (trained
    by the first search, loaded from the cache by the others), trial phase, front.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

EXPERIMENT = {
    "name": "scale-benchmark",
    "finetune": {"epochs": 3},
    "search": {"sampler": "nsga2", "seed": 0},
    "space": {
        "separable": {},
        "lowrank": {},
        "early_exit": {},
        "distillation": {},
        "pruning": {},
        "quantization": {},
        "clustering": {},
    },
}
PHASE_START = re.compile(r"^Running (\d+) trials, (\d+) at a time")
PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]")
BASELINE_TRAINED = "Training the baseline"
BASELINE_CACHE = Path(".netshrink") / "baselines"


@dataclass
class Figures:
    """One search's figures; every ``seconds_*`` is wall seconds, every ``share_*`` a fraction of the slot time."""

    concurrency: int
    trials_finished: int
    trials_failed: int
    phase_seconds: float
    trials_per_hour: float
    mean_seconds_trial: float
    mean_seconds_training: float
    mean_seconds_evaluation: float
    mean_seconds_latency: float
    mean_seconds_mlflow_export: float  # per finished trial, the last MLflow calls included
    mean_seconds_ray: float  # the "ray" remainder per finished trial
    slot_seconds: float
    share_training: float
    share_evaluation: float
    share_latency: float
    share_mlflow_export: float
    share_ray: float
    share_idle: float
    share_outside_training_and_evaluation: float
    mlflow_span_seconds: float  # first child run start to last child run end, for comparison with the phase
    baseline_trained: bool
    search_seconds: float  # the whole command, Ray start-up and baseline included


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16, help="trials per search (default 16)")
    parser.add_argument("--concurrency", default="1,2", help="comma-separated concurrencies, one search each (default 1,2)")
    parser.add_argument("--experiment", type=Path, help="experiment YAML to run instead of the built-in one; its tracking_uri is replaced by a SQLite file per run")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep", type=Path, help="run in this folder (created, must not exist) and keep it; default: a temp folder, removed")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one search may take (default 1800)")
    args = parser.parse_args()
    concurrencies = [int(value) for value in args.concurrency.split(",")]
    if args.trials < 1 or min(concurrencies) < 1:
        parser.error("--trials and --concurrency must be at least 1")

    root = args.keep or Path(tempfile.mkdtemp(prefix="netshrink-scale-"))
    root.mkdir(parents=True, exist_ok=args.keep is None)
    root = root.resolve()
    try:
        if args.experiment:
            experiment_file = args.experiment.resolve()
        else:
            experiment_file = root / "experiment.yaml"
            experiment_file.write_text(yaml.safe_dump(EXPERIMENT, sort_keys=False))
        name = yaml.safe_load(experiment_file.read_text())["name"]
        print(f"netshrink scale benchmark: {args.trials} trials at concurrency {', '.join(map(str, concurrencies))}; "
              f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}")
        print(f"experiment {experiment_file}; working folders under {root}", flush=True)
        if max(concurrencies) > (os.cpu_count() or 1):
            print(f"note: concurrency {max(concurrencies)} exceeds this machine's {os.cpu_count()} CPUs; Ray queues the extra trials")
        results = []
        previous: Path | None = None
        for concurrency in concurrencies:
            workdir = root / f"concurrency-{concurrency}"
            workdir.mkdir()
            if previous is not None and (previous / BASELINE_CACHE).is_dir():
                shutil.copytree(previous / BASELINE_CACHE, workdir / BASELINE_CACHE)
            figures = run_one(experiment_file, name, workdir, args.trials, concurrency, args.timeout)
            if previous is not None and figures.baseline_trained:
                raise SystemExit(f"error: the search at concurrency {concurrency} trained the baseline again; its cache was not reused")
            results.append(figures)
            previous = workdir
        print_table(results)
        if args.json:
            payload = {
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
                "experiment": str(experiment_file),
                "trials": args.trials,
                "results": [asdict(figures) for figures in results],
            }
            args.json.write_text(json.dumps(payload, indent=2) + "\n")
            print(f"figures written to {args.json}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def run_one(experiment_file: Path, name: str, workdir: Path, trials: int, concurrency: int, timeout: float) -> Figures:
    """Run one search, stamping its output lines as they arrive; then read its trials back from MLflow."""
    print(f"\n== concurrency {concurrency}: netshrink search --trials {trials} --concurrency {concurrency} (in {workdir})", flush=True)
    command = [
        sys.executable, "-m", "netshrink.cli", "search", str(experiment_file), "--trials", str(trials), "--concurrency", str(concurrency),
        "--tracking-uri", tracking_uri(workdir),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines must arrive when printed, or the stamps are wrong
    phase_start = phase_end = None
    baseline_trained = False
    started = time.time()
    with open(workdir / "search.log", "w") as log, open(workdir / "search.err", "w") as err:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            for line in process.stdout:
                now = time.time()
                log.write(f"{now - started:9.3f}  {line}")
                if PHASE_START.match(line):
                    phase_start = now
                elif PROGRESS.match(line):
                    phase_end = now
                elif line.startswith(BASELINE_TRAINED):
                    baseline_trained = True
                if PHASE_START.match(line) or PROGRESS.match(line) or line.startswith(("Training the baseline", "Using the cached")):
                    print(f"  {now - started:6.1f} s  {line.rstrip()[:150]}", flush=True)
            returncode = process.wait()
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
    if time.time() - started > timeout:
        raise SystemExit(f"error: the search at concurrency {concurrency} ran past --timeout {timeout:.0f} s; logs in {workdir}")
    search_seconds = time.time() - started
    if returncode != 0 or phase_start is None or phase_end is None:
        tail = (workdir / "search.err").read_text()[-3000:]
        raise SystemExit(f"error: the search at concurrency {concurrency} exited with {returncode}; logs in {workdir}\n{tail}")
    return figures_from_mlflow(workdir, name, concurrency, phase_start, phase_end, baseline_trained, search_seconds)


def figures_from_mlflow(
    workdir: Path, name: str, concurrency: int, phase_start: float, phase_end: float, baseline_trained: bool, search_seconds: float
) -> Figures:
    from mlflow.tracking import MlflowClient

    from netshrink.search.tracking import Tracker

    tracker = Tracker(tracking_uri(workdir))
    experiment_id = tracker.experiment_id(name, create=False)
    parent = tracker.latest_search(experiment_id)
    runs = tracker.trial_runs(experiment_id, parent.run_id)
    finished = [run for run in runs if run.info.status == "FINISHED" and "seconds_trial" in run.data.metrics]
    failed = len(runs) - len(finished)
    client: MlflowClient = tracker.client

    def total(metric: str) -> float:
        return sum(run.data.metrics[metric] for run in finished)

    # the trial's last MLflow calls (log_batch of the metrics, set_terminated) happen after seconds_trial is taken
    last_calls = sum(
        max(0.0, (run.info.end_time - client.get_metric_history(run.info.run_id, "seconds_trial")[-1].timestamp) / 1000) for run in finished
    )
    intervals = [(run.info.start_time / 1000, run.info.end_time / 1000) for run in runs if run.info.end_time]
    phase = phase_end - phase_start
    slots = concurrency * phase
    training, evaluation, latency, in_trial = (total(m) for m in ("seconds_training", "seconds_evaluation", "seconds_latency", "seconds_trial"))
    mlflow_export = in_trial - training - evaluation - latency + last_calls
    idle = idle_tail(intervals, concurrency)
    ray = slots - in_trial - last_calls - idle
    count = max(len(finished), 1)
    return Figures(
        concurrency=concurrency,
        trials_finished=len(finished),
        trials_failed=failed,
        phase_seconds=phase,
        trials_per_hour=len(finished) / phase * 3600,
        mean_seconds_trial=in_trial / count,
        mean_seconds_training=training / count,
        mean_seconds_evaluation=evaluation / count,
        mean_seconds_latency=latency / count,
        mean_seconds_mlflow_export=mlflow_export / count,
        mean_seconds_ray=ray / count,
        slot_seconds=slots,
        share_training=training / slots,
        share_evaluation=evaluation / slots,
        share_latency=latency / slots,
        share_mlflow_export=mlflow_export / slots,
        share_ray=ray / slots,
        share_idle=idle / slots,
        share_outside_training_and_evaluation=1 - (training + evaluation) / slots,
        mlflow_span_seconds=max(end for _, end in intervals) - min(start for start, _ in intervals) if intervals else 0.0,
        baseline_trained=baseline_trained,
        search_seconds=search_seconds,
    )


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def idle_tail(intervals: list[tuple[float, float]], concurrency: int) -> float:
    """Slot seconds with no trial run open, from the last run's start to the last run's end."""
    if not intervals:
        return 0.0
    begin, end = max(start for start, _ in intervals), max(stop for _, stop in intervals)
    points = sorted({begin, end, *(t for interval in intervals for t in interval if begin < t < end)})
    idle = 0.0
    for left, right in zip(points, points[1:]):
        running = sum(1 for start, stop in intervals if start <= left and stop >= right)
        idle += max(0, concurrency - running) * (right - left)
    return idle


def print_table(results: list[Figures]) -> None:
    print("\nTrial phase: from 'Running N trials' to the last trial's progress line (baseline, Ray start-up and the front excluded).")
    print("Slot time = concurrency x trial phase. Below it, each part as seconds per finished trial and as a share of the slot time;")
    print("the parts add up to the slot time. Definitions: the docstring of benchmarks/scale.py.\n")

    def split(share: str):
        return lambda f: f"{getattr(f, share) * f.slot_seconds / max(f.trials_finished, 1):.2f} s {getattr(f, share):6.1%}"

    rows = [
        ("trials finished (failed)", lambda f: f"{f.trials_finished} ({f.trials_failed})"),
        ("trial phase", lambda f: f"{f.phase_seconds:.1f} s"),
        ("trials per hour", lambda f: f"{f.trials_per_hour:.0f}"),
        ("mean trial in the worker", lambda f: f"{f.mean_seconds_trial:.2f} s"),
        ("slot time per trial", lambda f: f"{f.slot_seconds / max(f.trials_finished, 1):.2f} s"),
        ("  training", split("share_training")),
        ("  evaluation", split("share_evaluation")),
        ("  latency measurement", split("share_latency")),
        ("  MLflow, export, artifact", split("share_mlflow_export")),
        ("  Ray (remainder)", split("share_ray")),
        ("  idle tail", split("share_idle")),
        ("outside training+evaluation", lambda f: f"{f.share_outside_training_and_evaluation:.1%}"),
        ("baseline", lambda f: "trained" if f.baseline_trained else "from the cache"),
        ("whole command", lambda f: f"{f.search_seconds:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'':<{width}}  " + "  ".join(f"{'concurrency ' + str(f.concurrency):>16}" for f in results))
    for label, cell in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{cell(f):>16}" for f in results))


if __name__ == "__main__":
    main()
