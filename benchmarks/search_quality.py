"""Search-quality benchmark, around time: how soon does a search have a front you can trust, on a model it was never tuned on?

Each search runs through the real CLI (``netshrink search``: Ray Tune, Optuna, SQLite MLflow) under a wall-clock
budget (``search.budget``), the same for every configuration on a model, and is read back from MLflow. Models:

- ``lenet5``: the built-in task (``spaces/digits.yaml``), the one netshrink's informed start was measured on;
- ``residual_cnn``: a residual CNN with BatchNorm and a channel concatenation on the 8x8 digits
  (``benchmarks/quality_models.py``), never used to tune anything;
- ``vit``: the built-in vision transformer on the 8x8 digits (``spaces/digits-vit.yaml``).

Configurations (``--configs``):

- ``default``: the experiment file as it is (TPE, informed start, ``multi_fidelity: auto``, which is off for the
  presets' 3 fine-tuning epochs);
- ``no-mf``: the default without multi-fidelity (every trial fine-tunes ``finetune.epochs``);
- ``mf``: the default with multi-fidelity forced on (rungs of 1 and 3 epochs);
- ``random``: random sampling, no informed start, no multi-fidelity: what a user gets without steering;
- ``no-start``: the default without the informed start (what the start contributes on each model);
- ``nsga2``, ``tpe``, ``gp``, ``botorch``: the default with that sampler (the sampler comparison; ``botorch`` needs
  ``pip install 'netshrink[botorch]'``);
- ``before``: netshrink before issue 24 (NSGA-II, informed start, no multi-fidelity), under the same budget;
- ``eta2``, ``eta4``, ``min2``: the default with another reduction factor or first rung (the rung defaults' evidence);
- ``rungs15``: refinement folded into the rungs (1, 3, 9, 15 epochs; no refinement after the trials), so promising
  trials reach their long fine-tuning while the search runs instead of at its end.

Figures, per search and as mean and spread over seeds:

- **time to 90%**: wall seconds from the search's start until its front reaches 90% of the reference front's
  useful hypervolume. The reference front is the union of every point of every search on that model. A run that
  never reaches it counts as its whole budget and is marked ``>``;
- **useful hypervolume** at the end: the front's share of the box with the metric from (baseline - 2 points) to the
  baseline, size from 0 to the baseline's, latency from 0 to 1.2x the baseline's; each axis normalised to [0, 1] and
  points better than the baseline's metric clipped to it, so a useless tiny model adds nothing. The metric is the
  validation figure (the split that selects the front); refined runs count, as they are on the search's front;
- **best size ratio and best speedup within 0.5 and 1 point** of the baseline's metric on the **test split**, among the
  search's front (chosen on validation, then judged on held-out data);
- **hopeless time**: the share of trial time spent on trials whose last validation metric ended more than 10 points
  under the baseline's;
- **trials** run (refinements not counted);
- **measure share**: the share of trial time that is not compression and fine-tuning (writing the artifact, the ONNX
  export, latency timing, scoring the splits), summed over the trials' last reports. Successive halving over
  fine-tuning can save at most the other share: on a model whose trials are mostly measurement it has nothing to save.

A configuration whose validated experiment file is the same as one listed before it in ``CONFIGS`` (``no-mf`` and
``tpe`` under today's defaults) is that search, read back and reported under both names, not run twice.

It states the machine, the budgets and the seeds, asserts nothing, and resumes: a search that finished is read
back, a half-finished one is run again from scratch (its folder removed), so an interrupted benchmark goes on with
the same command. Each model's baseline is trained once, before any timed search (``warm-up``).

The whole comparison (default, no-mf, random, no-start, nsga2, gp, botorch; three models, three seeds: 63 searches of
1.5 to 2 minutes) takes about 2 hours on 2 cores; the three required configurations alone about 55 minutes.

    .venv/bin/python benchmarks/search_quality.py --keep /tmp/sq                  # the three required configurations
    .venv/bin/python benchmarks/search_quality.py --keep /tmp/sq --configs default no-mf random no-start nsga2 gp botorch
    .venv/bin/python benchmarks/search_quality.py --keep /tmp/sq --configs nsga2 tpe gp --models lenet5
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HOPELESS = 0.10  # 10 points under the baseline's validation metric
USEFUL_DROP = 0.02  # the useful box: 2 points under the baseline ...
USEFUL_LATENCY = 1.2  # ... and up to 1.2x its latency
REACH = 0.9  # time to 90% of the reference front's useful hypervolume

DROP = "<drop>"  # an override that removes the preset's key
MODELS = {  # name -> (preset, overrides, budget minutes)
    "lenet5": ("digits.yaml", {}, 1.5),
    "residual_cnn": (
        "digits.yaml",
        # early_exit.after of the preset names LeNet-5's layers: this model's exits go where the default puts them (the middle cut point)
        {"task": {"model": "quality_models:residual_cnn", "dataset_args": {"image_size": 8, "seed": 0}, "train": {"epochs": 40, "lr": 0.003}},
         "space": {"early_exit": {"after": DROP}}},
        1.5,
    ),
    "vit": ("digits-vit.yaml", {}, 2.0),
}
CONFIGS = {
    "default": {},
    "no-mf": {"search": {"multi_fidelity": False}},
    "mf": {"search": {"multi_fidelity": True}},
    "random": {"search": {"sampler": "random", "informed_start": False, "multi_fidelity": False}},
    "no-start": {"search": {"informed_start": False}},
    "nsga2": {"search": {"sampler": "nsga2"}},
    "tpe": {"search": {"sampler": "tpe"}},
    "botorch": {"search": {"sampler": "botorch"}},
    "gp": {"search": {"sampler": "gp"}},
    "before": {"search": {"sampler": "nsga2", "multi_fidelity": False}},
    "eta2": {"search": {"multi_fidelity": {"reduction_factor": 2}}},  # the rung defaults, measured against their neighbours
    "eta4": {"search": {"multi_fidelity": {"reduction_factor": 4}}},
    "min2": {"search": {"multi_fidelity": {"min_epochs": 2}}},
    # refinement as the top rungs: trials promoted past 3 epochs go on to 15 during the search, no refinement after it
    "rungs15": {"finetune": {"epochs": 15}, "refine": {"epochs": 0}},
}
REQUIRED = ["default", "no-mf", "random"]


@dataclass
class Point:
    seconds: float  # when it was measured, from the search's start
    metric: float  # validation
    test: float
    size: float
    latency: float


@dataclass
class Search:
    model: str
    config: str
    seed: int
    budget_s: float
    wall_s: float
    baseline: dict[str, float]
    points: list[Point]
    front: list[Point]
    trials: int
    trial_seconds: float
    hopeless_seconds: float
    training_seconds: float  # compression + fine-tuning (+ earlier rungs' measurement), as trials log `seconds_training`
    figures: dict[str, float | None] = field(default_factory=dict)
    same_as: str | None = None  # the configuration whose search this one is (the same experiment once validated)


def deep_update(target: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if value == DROP:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = value
    return target


def experiment(model: str, config: str) -> dict:
    """The experiment file of ``config`` on ``model``, as a dict, before the name, seed, budget and tracking are set."""
    preset, overrides, _ = MODELS[model]
    raw = yaml.safe_load((ROOT / "spaces" / preset).read_text())
    deep_update(raw, yaml.safe_load(yaml.safe_dump(overrides)))
    deep_update(raw, yaml.safe_load(yaml.safe_dump(CONFIGS.get(config, {}))))
    return raw


def same_search(model: str, config: str) -> str | None:
    """The configuration run earlier in ``CONFIGS`` whose search ``config`` is, once validated (``tpe`` where TPE is the
    default sampler, ``no-mf`` where multi-fidelity is off by default): it is read, not run twice."""
    from netshrink.config import Experiment

    def resolved(name: str) -> dict:
        raw = experiment(model, name)
        raw.get("search", {}).pop("trials", None)
        validated = Experiment.model_validate(raw)
        dumped = validated.model_dump(mode="json")
        dumped["search"]["multi_fidelity"] = validated.search.multi_fidelity.epochs(validated.finetune.epochs)  # auto, resolved
        return dumped

    mine = resolved(config)
    return next((other for other in CONFIGS if other != config and list(CONFIGS).index(other) < list(CONFIGS).index(config) and resolved(other) == mine), None)


def experiment_file(model: str, config: str, seed: int, folder: Path, budget_minutes: float | None) -> Path:
    _, _, minutes = MODELS[model]
    raw = experiment(model, config)
    raw["name"] = f"{model}-{config}-s{seed}"
    search = raw.setdefault("search", {})
    search.pop("trials", None)
    search["seed"] = seed
    search["budget"] = {"minutes": budget_minutes or minutes}
    raw["tracking_uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    shutil.copy(ROOT / "benchmarks" / "quality_models.py", folder)  # a `module:factory` is imported from the experiment file's folder
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(args: list[str], cwd: Path, log: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", *args], cwd=cwd, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    return result


def warm_up(workdir: Path, model: str) -> None:
    """Train and cache the model's baseline with a one-trial search, so no timed search pays for it."""
    folder = workdir / model / "warm-up"
    if (folder / "done").is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = experiment_file(model, "no-mf", 0, folder, 0.1)
    raw = yaml.safe_load(path.read_text())
    raw["search"].pop("budget")
    raw["search"]["trials"] = 1
    raw["refine"] = {"epochs": 0}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run(["search", str(path)], workdir / model, folder / "search.log")
    if "Baseline: " not in result.stdout:  # the trial itself may fail the floor: the baseline is what the warm-up is for
        sys.exit(f"warm-up of {model} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    (folder / "done").write_text("ok")


def finished(folder: Path, name: str):
    if not (folder / "mlflow.db").is_file():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return None
    parents = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("netshrink.role") == "search" and r.info.status == "FINISHED"]
    return (client, experiment, parents[0]) if parents else None


def search(workdir: Path, model: str, config: str, seed: int, budget_minutes: float | None) -> Search:
    twin = same_search(model, config)
    if twin is not None:
        found = search(workdir, model, twin, seed, budget_minutes)
        found.config, found.same_as = config, twin
        return found
    name = f"{model}-{config}-s{seed}"
    folder = workdir / model / name
    done = finished(folder, name)
    if done is None:
        shutil.rmtree(folder, ignore_errors=True)  # half-finished: from scratch
        folder.mkdir(parents=True)
        path = experiment_file(model, config, seed, folder, budget_minutes)
        result = run(["search", str(path)], workdir / model, folder / "search.log")
        if result.returncode != 0:
            sys.exit(f"search {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        done = finished(folder, name)
    return read_search(done, model, config, seed, budget_minutes or MODELS[model][2])


def read_search(done, model: str, config: str, seed: int, minutes: float) -> Search:
    from netshrink.search.front import TrialPoint, pareto_front
    from netshrink.search.tracking import Tracker

    client, experiment, parent = done
    record = Tracker(client.tracking_uri).search_record(parent)
    baseline = record.baseline
    runs = [r for r in client.search_runs([experiment.experiment_id], max_results=10_000) if r.data.tags.get("netshrink.role") == "trial"]
    start = parent.info.start_time
    points, as_trial = [], []
    for run in runs:
        metrics = run.data.metrics
        if run.info.status != "FINISHED" or "size_bytes" not in metrics:
            continue
        point = Point((run.info.end_time - start) / 1000, metrics["accuracy"], metrics.get("test_accuracy", 0.0), metrics["size_bytes"], metrics["latency_ms"])
        points.append(point)
        as_trial.append(TrialPoint(run.info.run_id, run.info.run_name, point.metric, point.size, point.latency, "{}", "", {"t": id(point)}))
    by_id = {id(p): p for p in points}
    front = [by_id[int(p.extra["t"])] for p in pareto_front(as_trial, ["accuracy", "size_bytes", "latency_ms"], ["max", "min", "min"], record.constraints)]
    trials = [r for r in runs if "refined_from" not in r.data.tags]
    seconds = hopeless = training = 0.0
    for run in trials:
        metrics = run.data.metrics
        spent = metrics.get("seconds_trial", 0.0)
        seconds += spent
        training += min(spent, metrics.get("seconds_training", 0.0))
        last = metrics.get("accuracy", metrics.get("stopped_accuracy"))
        if last is not None and last < baseline["accuracy"] - HOPELESS:
            hopeless += spent
    return Search(
        model=model, config=config, seed=seed, budget_s=60 * minutes, wall_s=(parent.info.end_time - start) / 1000, baseline=baseline,
        points=points, front=front, trials=len(trials), trial_seconds=seconds, hopeless_seconds=hopeless,
        training_seconds=training,
    )


def useful_hypervolume(points: list[Point], baseline: dict[str, float]) -> float:
    """The share of the useful box (module docstring) that ``points`` dominate: the metric from (baseline - 2 points) to
    the baseline, size from 0 to the baseline's, latency from 0 to 1.2x the baseline's, each normalised to [0, 1]; a point
    better than the baseline's metric counts as the baseline's. Points outside the box add nothing."""
    from netshrink.search.hypervolume import hypervolume

    scaled = [
        ((baseline["accuracy"] - min(p.metric, baseline["accuracy"])) / USEFUL_DROP, p.size / baseline["size_bytes"], p.latency / (USEFUL_LATENCY * baseline["latency_ms"]))
        for p in points
    ]
    return hypervolume(scaled, [1.0, 1.0, 1.0])


def time_to(points: list[Point], baseline: dict[str, float], target: float) -> float | None:
    """The first time the points measured so far reach ``target`` useful hypervolume; None if they never do."""
    ordered = sorted(points, key=lambda p: p.seconds)
    for index in range(len(ordered)):
        if useful_hypervolume(ordered[: index + 1], baseline) >= target - 1e-12:
            return ordered[index].seconds
    return None


def best_within(front: list[Point], baseline: dict[str, float], points_of_drop: float) -> tuple[float | None, float | None]:
    """The best size ratio and the best speedup among front points within ``points_of_drop`` of the baseline's test metric."""
    close = [p for p in front if p.test >= baseline["test_accuracy"] - points_of_drop - 1e-12]
    if not close:
        return None, None
    return max(baseline["size_bytes"] / p.size for p in close), max(baseline["latency_ms"] / p.latency for p in close)


def figure(searches: list[Search]) -> None:
    """Each search's figures, against its model's reference front (every point of every search on the model)."""
    by_model: dict[str, list[Search]] = {}
    for s in searches:
        by_model.setdefault(s.model, []).append(s)
    for model, group in by_model.items():
        baseline = group[0].baseline
        reference = useful_hypervolume([p for s in group for p in s.points], baseline)
        for s in group:
            reached = time_to(s.points, baseline, REACH * reference) if reference > 0 else None
            s.figures = {
                "reference": reference,
                "time90": reached if reached is not None else s.budget_s,
                "time90_reached": reached is not None,
                "hv": useful_hypervolume(s.points, baseline),
                "size05": best_within(s.front, baseline, 0.005)[0],
                "speed05": best_within(s.front, baseline, 0.005)[1],
                "size1": best_within(s.front, baseline, 0.01)[0],
                "speed1": best_within(s.front, baseline, 0.01)[1],
                "hopeless": s.hopeless_seconds / s.trial_seconds if s.trial_seconds else 0.0,
                "trials": float(s.trials),
                "measure": 1 - s.training_seconds / s.trial_seconds if s.trial_seconds else 0.0,
            }


def spread(values: list[float | None], fmt: str) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    sd = statistics.pstdev(present) if len(present) > 1 else 0.0
    missing = f" ({len(values) - len(present)} none)" if len(present) < len(values) else ""
    return f"{fmt.format(statistics.fmean(present))} +- {fmt.format(sd)}{missing}"


def report(searches: list[Search]) -> None:
    ratio = lambda v: f"{v:.1f}x" if v else "none"  # noqa: E731
    print("\nPer search (time to 90%: '>' never reached, counted as the budget):")
    print(f"  {'search':<26} {'t90 s':>7} {'useful HV':>9} {'size<=.5':>8} {'fast<=.5':>8} {'size<=1':>8} {'fast<=1':>8} {'hopeless':>8} {'trials':>6} {'wall s':>6} {'measure':>7}")
    for s in searches:
        f = s.figures
        t90 = f"{'' if f['time90_reached'] else '>'}{f['time90']:.0f}"
        print(
            f"  {s.model + '-' + s.config + f'-s{s.seed}':<26} {t90:>7} {f['hv']:>9.3f} {ratio(f['size05']):>8} {ratio(f['speed05']):>8} "
            f"{ratio(f['size1']):>8} {ratio(f['speed1']):>8} {f['hopeless']:>8.1%} {s.trials:>6} {s.wall_s:>6.0f} {f['measure']:>7.0%}"
        )
    print("\nMean +- spread (population standard deviation) over seeds:")
    groups: dict[tuple[str, str], list[Search]] = {}
    for s in searches:
        groups.setdefault((s.model, s.config), []).append(s)
    print(f"  {'model':<13} {'config':<9} {'seeds':>5} {'time to 90% (s)':>18} {'useful HV':>15} {'size x <=0.5pt':>16} {'faster <=0.5pt':>15} "
          f"{'size x <=1pt':>15} {'faster <=1pt':>14} {'hopeless time':>15} {'trials':>11} {'measure share':>15}")
    for (model, config), group in groups.items():
        f = [s.figures for s in group]
        unreached = sum(not x["time90_reached"] for x in f)
        t90 = spread([x["time90"] for x in f], "{:.0f}") + (f" ({unreached}>)" if unreached else "")
        print(
            f"  {model:<13} {config:<9} {len(group):>5} {t90:>18} {spread([x['hv'] for x in f], '{:.3f}'):>15} "
            f"{spread([x['size05'] for x in f], '{:.1f}'):>16} {spread([x['speed05'] for x in f], '{:.2f}'):>15} "
            f"{spread([x['size1'] for x in f], '{:.1f}'):>15} {spread([x['speed1'] for x in f], '{:.2f}'):>14} "
            f"{spread([x['hopeless'] for x in f], '{:.2f}'):>15} {spread([x['trials'] for x in f], '{:.1f}'):>11} {spread([x['measure'] for x in f], '{:.2f}'):>15}"
        )
    print("\nThe same, as a markdown table (the docs' form):\n")
    print("| model | config | time to 90% (s) | useful HV | x smaller within 0.5 pt (test) | x faster within 0.5 pt | x smaller within 1 pt | x faster within 1 pt | hopeless time | trials | measure share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (model, config), group in groups.items():
        f = [s.figures for s in group]
        unreached = sum(not x["time90_reached"] for x in f)
        t90 = spread([x["time90"] for x in f], "{:.0f}") + (f" ({unreached} of {len(f)} >)" if unreached else "")
        twin = f" (= {group[0].same_as})" if group[0].same_as else ""
        print(
            f"| {model} | {config}{twin} | {t90} | {spread([x['hv'] for x in f], '{:.3f}')} | {spread([x['size05'] for x in f], '{:.1f}')} | "
            f"{spread([x['speed05'] for x in f], '{:.2f}')} | {spread([x['size1'] for x in f], '{:.1f}')} | {spread([x['speed1'] for x in f], '{:.2f}')} | "
            f"{statistics.fmean(x['hopeless'] for x in f):.0%} | {statistics.fmean(x['trials'] for x in f):.1f} | {statistics.fmean(x['measure'] for x in f):.0%} |"
        )
    print("\nTargets (means over seeds):")
    for model in dict.fromkeys(s.model for s in searches):
        get = lambda config, key: [s.figures[key] for s in searches if s.model == model and s.config == config]  # noqa: E731
        if get("default", "hv") and get("random", "hv"):
            t_default, t_random = statistics.fmean(get("default", "time90")), statistics.fmean(get("random", "time90"))
            hv_default, hv_random = statistics.fmean(get("default", "hv")), statistics.fmean(get("random", "hv"))
            print(
                f"  {model}: time to 90% default {t_default:.0f} s vs random {t_random:.0f} s ({t_default / t_random:.2f}x; target <= 0.5x: "
                f"{'met' if t_default <= 0.5 * t_random else 'missed'}); useful HV {hv_default:.3f} vs {hv_random:.3f} "
                f"({'met' if hv_default >= hv_random else 'missed'})"
            )
        if model == "lenet5" and get("default", "size05"):
            sizes = [v for v in get("default", "size05") if v]
            mean = statistics.fmean(sizes) if sizes else 0.0
            print(f"  lenet5: best size ratio within 0.5 pt (test) default {mean:.1f}x over {len(sizes)} of {len(get('default', 'size05'))} seeds "
                  f"(target >= 100x: {'met' if mean >= 100 and len(sizes) == len(get('default', 'size05')) else 'missed'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=REQUIRED, choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, help="the budget of every search (default: per model, see MODELS)")
    parser.add_argument("--keep", type=Path, help="working folder (default: a temporary one); rerun with it to resume")
    args = parser.parse_args()
    workdir = (args.keep or Path(tempfile.mkdtemp(prefix="netshrink-search-quality-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    import netshrink

    print(f"Machine: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {platform.platform()}; netshrink {netshrink.__version__}")
    budgets = ", ".join(f"{m} {args.minutes or MODELS[m][2]:g} min" for m in args.models)
    print(f"Budget per search (wall clock, refinement included, the same for every configuration on a model): {budgets}; "
          f"configs {args.configs}; seeds {args.seeds}; folder {workdir}", flush=True)
    searches = []
    for model in args.models:
        (workdir / model).mkdir(parents=True, exist_ok=True)
        warm_up(workdir, model)
        for config in args.configs:
            for seed in args.seeds:
                started = time.time()
                s = search(workdir, model, config, seed, args.minutes)
                searches.append(s)
                twin = f" (the same search as {s.same_as}: read, not run again)" if s.same_as else ""
                print(f"  {model}-{config}-s{seed}: {s.trials} trials, {len(s.points)} points, wall {s.wall_s:.0f} s "
                      f"(this run {time.time() - started:.0f} s){twin}", flush=True)
    figure(searches)
    report(searches)


if __name__ == "__main__":
    main()
