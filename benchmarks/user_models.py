"""The models people ship: what the default search finds on each, at the same budget.

For each model it runs ``netshrink search`` (the real CLI, MLflow in SQLite, a working folder per model, one cached
baseline per model) with every technique that applies to the model at its default knobs (netshrink's default
space), then reads every run back from MLflow and prints:

- the baseline: validation and test metric, parameters, artifact bytes, batch-1 latency (ONNX Runtime, 1 thread);
- the best size ratio and the best speedup among trials within 1 point of the baseline's metric **on the test
  split** (which plays no part in the search), each with its recipe;
- per trial: median wall time, the most peak resident memory (``peak_rss_bytes``), and the failed trials.

Models: a CIFAR-style ResNet-18 (11.2M parameters) and a MobileNetV2 (torchvision's layouts, ``tests/families.py``) on
the digits at 3x32x32; Hugging Face ``BertForSequenceClassification`` (4 layers, width 256, sequence length 64) on
synthetic sentences and ``ViTForImageClassification`` on the digits; the built-in LeNet-5 and ViT. Each baseline is
trained by netshrink (``task.train``) on the task's training split. The targets of issue 23 are printed beside the
figures. A benchmark, not a test: it asserts nothing.

    .venv/bin/python benchmarks/user_models.py                                  # every model, seed 0
    .venv/bin/python benchmarks/user_models.py --models resnet18 bert --keep /tmp/um --trials 12 --seeds 0 1
    .venv/bin/python benchmarks/user_models.py --models resnet18 --epochs 2 --no-early-stopping --refine-epochs 4 --refine-count 2

With ``--refine-epochs`` the budget ends with refinement (``refine.points: potential``: the trials within ``reach`` of
``min_accuracy`` with the most to gain, fine-tuned longer); the table then also says what the trials alone found.
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
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WITHIN = 0.01  # 1 point of the metric, on the test split

IMAGE_SPACE = ["separable", "lowrank", "early_exit", "distillation", "pruning", "quantization", "clustering"]
TEXT_SPACE = ["lowrank", "early_exit", "distillation", "pruning", "quantization", "clustering"]

# name -> (task section, techniques of its default search, target as (size ratio, speedup) or None)
MODELS: dict[str, tuple[dict, list[str], tuple[float, float] | None]] = {
    "resnet18": (
        {"dataset": "benchmarks.user_tasks:digits_rgb", "model": "benchmarks.user_tasks:resnet18", "train": {"epochs": 8, "lr": 0.001}},
        IMAGE_SPACE, (10.0, 2.0),
    ),
    "mobilenet_v2": (
        {"dataset": "benchmarks.user_tasks:digits_rgb", "model": "benchmarks.user_tasks:mobilenet_v2", "train": {"epochs": 15, "lr": 0.002}},
        IMAGE_SPACE, (4.0, 1.5),
    ),
    "bert": (
        {
            "dataset": "benchmarks.user_tasks:sentences", "model": "benchmarks.user_tasks:bert",
            "model_args": {"vocab_size": 512, "hidden_size": 256, "layers": 4, "heads": 4, "max_length": 64},
            "train": {"epochs": 6, "lr": 0.0005},
        },
        TEXT_SPACE, (4.0, 1.5),
    ),
    "hf_vit": (
        {
            "dataset": "benchmarks.user_tasks:digits_pixels", "model": "benchmarks.user_tasks:vit",
            "model_args": {"image_size": 32, "patch_size": 4, "hidden_size": 128, "layers": 4, "heads": 4},
            "train": {"epochs": 20, "lr": 0.001},
        },
        TEXT_SPACE, None,
    ),
    "lenet5": ({"dataset": "digits", "model": "lenet5", "train": {"epochs": 30}}, IMAGE_SPACE, None),
    "vit": ({"dataset": "digits", "dataset_args": {"image_size": 8}, "model": "vit", "train": {"epochs": 60}}, TEXT_SPACE, None),
}


def experiment(
    name: str, seed: int, trials: int, epochs: int, early_stopping: bool = True, refine_epochs: int = 0, refine_count: int = 2
) -> dict:
    task, techniques, _ = MODELS[name]
    return {
        "name": f"{name}-seed{seed}" + ("" if early_stopping else "-nostop") + (f"-refine{refine_count}x{refine_epochs}" if refine_epochs else ""),
        "task": task,
        "finetune": {"epochs": epochs},
        "search": {"trials": trials, "max_concurrent": 2, "seed": seed, "early_stopping": early_stopping},
        "refine": {"epochs": refine_epochs, "count": refine_count},
        "measure": {"repeats": 400, "warmup": 50},
        "space": {technique: None for technique in techniques},
    }


def run(workdir: Path, config: dict) -> str:
    """``netshrink search`` on ``config`` in ``workdir``; returns the parent run id (an earlier finished one is read back)."""
    from netshrink.search.tracking import Tracker

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    if (workdir / "mlflow.db").is_file():
        tracker = Tracker(uri)
        experiment_id = tracker.experiment_id(config["name"], create=False)
        record = tracker.latest_search(experiment_id) if experiment_id is not None else None
        if record is not None and record.status == "FINISHED":
            print(f"  {config['name']}: finished before, read back", flush=True)
            return record.run_id
    path = workdir / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.time()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(workdir / f"{config['name']}.log", "w") as log:
        result = subprocess.run([sys.executable, "-m", "netshrink.cli", "search", path.name], cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        sys.exit(f"search {config['name']} failed (exit {result.returncode}); see {workdir / (config['name'] + '.log')}")
    print(f"  {config['name']}: {time.time() - started:.0f} s", flush=True)
    tracker = Tracker(uri)
    return tracker.latest_search(tracker.experiment_id(config["name"], create=False)).run_id


def figures(workdir: Path, name: str, run_id: str) -> dict:
    from netshrink.search.report import collect_points
    from netshrink.search.tracking import Tracker

    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}")
    record = tracker.search_record(run_id)
    metric = record.metric
    points, failed = collect_points(tracker, tracker.experiment_id(name, create=False), run_id, metric)
    base = record.baseline
    test_key = f"test_{metric}"
    close = [p for p in points if p.extra.get(test_key, float("-inf")) >= base[test_key] - WITHIN and "stopped" not in p.extra]
    smallest = max(close, key=lambda p: p.extra["size_ratio"], default=None)
    fastest = max(close, key=lambda p: p.extra["speedup"], default=None)
    trials = [p for p in close if p.refined_from is None]  # what the trials alone found, before refinement
    return {
        "metric": metric, "base": base, "smallest": smallest, "fastest": fastest, "failed": failed, "finished": len(points),
        "trials_only": (max(p.extra["size_ratio"] for p in trials), max(p.extra["speedup"] for p in trials)) if trials else None,
        "seconds": [p.extra["seconds_trial"] for p in points if "seconds_trial" in p.extra and p.refined_from is None],
        "refined": sum(p.refined_from is not None for p in points),
        "memory": [p.extra["peak_rss_bytes"] for p in points if "peak_rss_bytes" in p.extra],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="search.seed of each search")
    parser.add_argument("--trials", type=int, default=12, help="trials per search (the same for every model)")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per trial (the same for every model)")
    parser.add_argument("--keep", type=Path, help="working folder to keep (default: a temporary one)")
    parser.add_argument(
        "--no-early-stopping", action="store_true",
        help="search.early_stopping: false (its table was measured on LeNet-5, and stops a ResNet's pruned trials after 4 steps)",
    )
    parser.add_argument(
        "--refine-epochs", type=int, default=0,
        help="refine.epochs: after the trials, fine-tune the --refine-count most promising points this long (refine.points: potential); 0: none",
    )
    parser.add_argument("--refine-count", type=int, default=2, help="refine.count: how many points are refined")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="netshrink-user-models-"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    print(f"Machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}")
    print(
        f"Budget per model and seed: {args.trials} trials, {args.epochs} fine-tuning epoch(s) each, 2 at a time, "
        + (f"then {args.refine_count} point(s) refined for {args.refine_epochs} epochs, " if args.refine_epochs else "no refinement, ")
        + f"early stopping {'off' if args.no_early_stopping else 'on'}; seeds {args.seeds}"
    )
    print(f"Working folders under {root}")
    results: dict[str, list[dict]] = {}
    for name in args.models:
        workdir = root / name
        workdir.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            config = experiment(
                name, seed, args.trials, args.epochs, early_stopping=not args.no_early_stopping,
                refine_epochs=args.refine_epochs, refine_count=args.refine_count,
            )
            run_id = run(workdir, config)
            results.setdefault(name, []).append({**figures(workdir, config["name"], run_id), "seed": seed})
    print_table(results)


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} +/- {format(statistics.pstdev(values), fmt)}"


def _alone(best: tuple[float, float] | None) -> str:
    return "none within 1 point" if best is None else f"{best[0]:.1f}x, {best[1]:.2f}x"


def print_table(results: dict[str, list[dict]]) -> None:
    print("\nBaselines (seed 0's search; the baseline is the same for every seed)")
    print(f"{'model':<13} {'metric':<9} {'validation':>10} {'test':>8} {'parameters':>12} {'artifact bytes':>15} {'latency ms':>11}")
    for name, runs in results.items():
        base, metric = runs[0]["base"], runs[0]["metric"]
        print(
            f"{name:<13} {metric:<9} {base[metric]:>10.4f} {base['test_' + metric]:>8.4f} {base.get('parameters', float('nan')):>12,.0f} "
            f"{base['size_bytes']:>15,.0f} {base['latency_ms']:>11.4f}"
        )
    print("\nDefault search, within 1 point of the baseline's metric on the test split (mean +/- spread over seeds)")
    print(f"{'model':<13} {'x smaller':>14} {'x faster':>14} {'target':>12} {'s/trial':>9} {'peak MiB':>9} {'failed':>7}")
    for name, runs in results.items():
        ratios = [r["smallest"].extra["size_ratio"] for r in runs if r["smallest"]]
        speedups = [r["fastest"].extra["speedup"] for r in runs if r["fastest"]]
        target = MODELS[name][2]
        seconds = [statistics.median(r["seconds"]) for r in runs if r["seconds"]]
        memory = [max(r["memory"]) / 2**20 for r in runs if r["memory"]]
        print(
            f"{name:<13} {_spread(ratios, '.1f'):>14} {_spread(speedups, '.2f'):>14} "
            f"{(f'{target[0]:.0f}x, {target[1]:.1f}x' if target else '-'):>12} {_spread(seconds, '.0f'):>9} "
            f"{(f'{max(memory):.0f}' if memory else '-'):>9} {sum(r['failed'] for r in runs):>7}"
        )
    if any(r["refined"] for runs in results.values() for r in runs):
        print("\nThe trials alone, before refinement (seed by seed): x smaller, x faster within 1 point on the test split")
        for name, runs in results.items():
            print(f"  {name:<13} " + "; ".join(f"seed {r['seed']}: " + _alone(r["trials_only"]) for r in runs))
    print("\nRecipes of the best points (seed by seed)")
    for name, runs in results.items():
        for r in runs:
            metric = r["metric"]
            for label, point in (("smallest", r["smallest"]), ("fastest", r["fastest"])):
                if point is None:
                    print(f"  {name} seed {r['seed']} {label}: no trial within 1 point on the test split")
                    continue
                print(
                    f"  {name} seed {r['seed']} {label}: {point.extra['size_ratio']:.1f}x smaller, {point.extra['speedup']:.2f}x faster, "
                    f"test {metric} {point.extra['test_' + metric]:.4f} ({point.name}): {point.summary}"
                )


if __name__ == "__main__":
    main()
