"""Search-quality benchmark: does one search find the good models every time, and how much budget goes to waste?

On the built-in task (LeNet-5 on scikit-learn's digits) it runs the default experiment
(``spaces/digits.yaml``: its sampler, its budget, its refinement) once per seed and per
sampler configuration, all in one working folder so that one cached baseline serves every
search, each through the real CLI (``netshrink search``) with MLflow in SQLite, then reads
every run back from MLflow. Configurations:

- ``default``: the experiment file as it is;
- ``tpe``: the same with ``search.sampler: tpe``;
- ``random``: ``search.sampler: random`` with no informed start (``search.informed_start: false``
  where the installed netshrink has that knob): plain random sampling of the default space, the
  reference a user gets without any steering;
- ``random-start``: random sampling after the informed start, to tell the start's share of the
  gain from the sampler's (only where the installed netshrink has an informed start).

For each it prints mean and spread (population standard deviation; min and max) over seeds of:

- **useful hypervolume**: the front's share of the box with accuracy from (baseline - 2 pt) to the
  baseline, size from 0 to the baseline's, and latency from 0 to 1.2x the baseline's. Each axis is
  normalised to [0, 1], and points better than the baseline's accuracy are clipped to it. Trials
  outside the box add nothing, so a useless tiny model does not count. Accuracy is validation
  accuracy (the split that selects the front); refined runs count, as they are on the search's front;
- **best size ratio within 0.5 pt and within 1 pt** of the baseline's validation accuracy (the test
  accuracy change of the 0.5-pt point is printed per seed next to it);
- **share of trials below baseline - 10 pt**: trials (not refinements) whose last measured
  validation accuracy is more than 10 points under the baseline's, however they ended;
- **late hopeless share**: trials that end below baseline - 10 pt *without being stopped within
  the first quarter of their fine-tuning* (the issue's target: at most 20%);
- **trials stopped early**, and the wall time of the search.

It states the machine and asserts nothing.

    .venv/bin/python benchmarks/search_quality.py                       # seeds 0 1 2, every configuration
    .venv/bin/python benchmarks/search_quality.py --configs default random --seeds 0 1 2 --keep /tmp/sq
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HOPELESS = 0.10  # 10 points under the baseline's validation accuracy
USEFUL_ACCURACY = 0.02  # the useful box: 2 points under the baseline ...
USEFUL_LATENCY = 1.2  # ... and up to 1.2x its latency
QUARTER = 0.25  # "stopped within the first quarter of its fine-tuning"


@dataclass
class SearchFigures:
    useful_hypervolume: float
    best_within_half: float | None
    best_within_one: float | None
    test_change_half: float | None
    trials: int
    below_hopeless: int
    late_hopeless: int
    stopped: int
    seconds: float


def configurations(informed_start: bool) -> dict[str, dict]:
    configs = {"default": {}, "tpe": {"search": {"sampler": "tpe"}}}
    configs["random"] = {"search": {"sampler": "random", **({"informed_start": False} if informed_start else {})}}
    if informed_start:
        configs["random-start"] = {"search": {"sampler": "random"}}
    return configs


def has_informed_start() -> bool:
    from netshrink.config import SearchSettings

    return "informed_start" in SearchSettings.model_fields


def finished_before(workdir: Path, name: str) -> float | None:
    """The wall time of a search of this name that already finished in ``workdir`` (a rerun with --keep goes on from there)."""
    if not (workdir / "mlflow.db").is_file():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return None
    parents = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("netshrink.role") == "search" and r.info.status == "FINISHED"]
    return (parents[0].info.end_time - parents[0].info.start_time) / 1000 if parents else None


def run_search(workdir: Path, name: str, overrides: dict) -> float:
    earlier = finished_before(workdir, name)
    if earlier is not None:
        return earlier
    raw = yaml.safe_load((ROOT / "spaces" / "digits.yaml").read_text())
    raw["name"] = name
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "search", path.name], cwd=workdir, capture_output=True, text=True)
    (workdir / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"search {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.time() - started


def useful_hypervolume(points: list[tuple[float, float, float]], baseline: dict[str, float]) -> float:
    """Share of the useful box (module docstring) that ``points`` (accuracy, size, latency) dominate."""
    from netshrink.search.hypervolume import hypervolume

    scaled = [
        (
            (baseline["accuracy"] - min(accuracy, baseline["accuracy"])) / USEFUL_ACCURACY,
            size / baseline["size_bytes"],
            latency / (USEFUL_LATENCY * baseline["latency_ms"]),
        )
        for accuracy, size, latency in points
    ]
    # a point exactly at the baseline's accuracy scores 0 on that axis: it spans the box's whole accuracy depth
    return hypervolume(scaled, [1.0, 1.0, 1.0])


def figures_of(workdir: Path, name: str, seconds: float) -> SearchFigures:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=10_000)
    from netshrink.search.tracking import Tracker

    parent = next(r for r in runs if r.data.tags.get("netshrink.role") == "search")
    baseline = Tracker(f"sqlite:///{workdir / 'mlflow.db'}").search_record(parent).baseline
    children = [r for r in runs if r.data.tags.get("netshrink.role") == "trial"]
    finished = [r for r in children if r.info.status == "FINISHED" and "size_bytes" in r.data.metrics]
    points = [(r.data.metrics["accuracy"], r.data.metrics["size_bytes"], r.data.metrics["latency_ms"]) for r in finished]

    def best_within(points_of: list, within: float):
        close = [r for r in points_of if r.data.metrics["accuracy"] >= baseline["accuracy"] - within - 1e-12]
        return min(close, key=lambda r: r.data.metrics["size_bytes"]) if close else None

    half, one = best_within(finished, 0.005), best_within(finished, 0.01)
    trials = [r for r in children if "refined_from" not in r.data.tags]
    below = late = stopped = 0
    for run in trials:
        metrics, tags = run.data.metrics, run.data.tags
        accuracy = metrics.get("accuracy", metrics.get("stopped_accuracy"))
        stop_fraction = float(tags["stopped_at_fraction"]) if "stopped_at_fraction" in tags else None
        stopped += stop_fraction is not None
        if accuracy is not None and accuracy < baseline["accuracy"] - HOPELESS:
            below += 1
            late += stop_fraction is None or stop_fraction > QUARTER
    return SearchFigures(
        useful_hypervolume=useful_hypervolume(points, baseline),
        best_within_half=baseline["size_bytes"] / half.data.metrics["size_bytes"] if half else None,
        best_within_one=baseline["size_bytes"] / one.data.metrics["size_bytes"] if one else None,
        test_change_half=100 * (half.data.metrics["test_accuracy"] - baseline["test_accuracy"]) if half else None,
        trials=len(trials),
        below_hopeless=below,
        late_hopeless=late,
        stopped=stopped,
        seconds=seconds,
    )


def summary(values: list[float | None], fmt: str) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    spread = statistics.pstdev(present) if len(present) > 1 else 0.0
    missing = f" ({len(values) - len(present)} none)" if len(present) < len(values) else ""
    return f"{fmt.format(statistics.fmean(present))} +- {fmt.format(spread)} [{fmt.format(min(present))}, {fmt.format(max(present))}]{missing}"


def main() -> None:
    informed = has_informed_start()
    every = list(configurations(informed))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search.seed of each search")
    parser.add_argument("--configs", nargs="+", default=every, choices=every, help="sampler configurations to run")
    parser.add_argument("--keep", type=Path, help="working folder to keep (default: a temporary one)")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="netshrink-search-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    default = yaml.safe_load((ROOT / "spaces" / "digits.yaml").read_text())
    import netshrink

    print(f"Machine: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {platform.platform()}; netshrink {netshrink.__version__}")
    refine = default.get("refine", {})
    print(
        f"Budget per search: {default['search']['trials']} trials x {default['finetune']['epochs']} fine-tuning epochs, "
        f"{default['search']['max_concurrent']} at a time; refine {refine.get('count', 0)} points x {refine.get('epochs', 0)} epochs; "
        f"default sampler {default['search']['sampler']}; seeds {args.seeds}; folder {workdir}"
    )
    results: dict[str, dict[int, SearchFigures]] = {}
    configs = configurations(informed)
    for config in args.configs:
        for seed in args.seeds:
            name = f"{config}-s{seed}"
            overrides = {section: dict(values) for section, values in configs[config].items()}
            overrides.setdefault("search", {})["seed"] = seed
            seconds = run_search(workdir, name, overrides)
            figures = figures_of(workdir, name, seconds)
            results.setdefault(config, {})[seed] = figures
            half = f"{figures.best_within_half:.1f}x" if figures.best_within_half else "none"
            print(f"  {name}: {seconds:.0f} s, useful HV {figures.useful_hypervolume:.3f}, best within 0.5 pt {half}", flush=True)

    print("\nPer search:")
    print(f"  {'search':<18} {'useful HV':>9} {'<=0.5pt':>8} {'test chg':>8} {'<=1pt':>8} {'trials':>6} {'<-10pt':>6} {'late':>5} {'stopped':>7} {'wall s':>7}")
    for config, by_seed in results.items():
        for seed, f in by_seed.items():
            ratio = lambda value: f"{value:.1f}x" if value else "none"  # noqa: E731
            test = f"{f.test_change_half:+.2f}" if f.test_change_half is not None else "-"
            print(
                f"  {config + f'-s{seed}':<18} {f.useful_hypervolume:>9.3f} {ratio(f.best_within_half):>8} {test:>8} {ratio(f.best_within_one):>8} "
                f"{f.trials:>6} {f.below_hopeless:>6} {f.late_hopeless:>5} {f.stopped:>7} {f.seconds:>7.0f}"
            )
    print("\nMean +- spread [min, max] over seeds:")
    for config, by_seed in results.items():
        rows = list(by_seed.values())
        halves = [f.best_within_half for f in rows]
        present = [h for h in halves if h]
        print(f"  {config} ({len(rows)} seeds)")
        print(f"    useful hypervolume             {summary([f.useful_hypervolume for f in rows], '{:.3f}')}")
        print(f"    best size ratio within 0.5 pt  {summary(halves, '{:.1f}')}"
              + (f"; median {statistics.median(present):.1f}x, max/min {max(present) / min(present):.2f}" if present else ""))
        print(f"    best size ratio within 1 pt    {summary([f.best_within_one for f in rows], '{:.1f}')}")
        print(f"    share of trials below -10 pt   {summary([f.below_hopeless / f.trials for f in rows], '{:.1%}')}")
        print(f"    ... not stopped in 1st quarter {summary([f.late_hopeless / f.trials for f in rows], '{:.1%}')}")
        print(f"    trials stopped early           {summary([float(f.stopped) for f in rows], '{:.1f}')}")
        print(f"    wall time (s)                  {summary([f.seconds for f in rows], '{:.0f}')}")
    if "default" in results and "random" in results:
        default_hv = statistics.fmean(f.useful_hypervolume for f in results["default"].values())
        random_hv = statistics.fmean(f.useful_hypervolume for f in results["random"].values())
        print(f"\nDefault / random mean useful hypervolume: {default_hv / random_hv:.2f}x" if random_hv else "")


if __name__ == "__main__":
    main()
