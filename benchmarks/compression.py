"""Compression benchmark: how far netshrink shrinks LeNet-5, next to Deep Compression's published recipe.

Deep Compression (Han et al., ICLR 2016, Table 1) shrinks Caffe LeNet-5 39x, 1,720 KB to
44 KB, index and codebook included, with no loss of accuracy. This script runs, on the
built-in task (LeNet-5 on scikit-learn's digits at 28x28) and in one working folder so
that the baseline is trained once:

1. Deep Compression's recipe as published, written as a netshrink experiment, once per seed
   (``benchmarks/deep_compression.yaml``: per-layer kept fractions 66/12/8/19%,
   256 shared values in the convolutions and 32 in the fully connected layers,
   Huffman coding; 3 pruning steps and 20 epochs of retraining);
2. the default search (``spaces/digits.yaml``: every technique, 32 trials, NSGA-II,
   refinement of the 4 trials with most to gain (`refine.points: potential`) for 15 epochs), once per seed.

Each through the real CLI (``netshrink search``), with MLflow in SQLite, then read back
from MLflow. For each it prints artifact bytes, size ratio, validation and test accuracy
with their change from the baseline, and the latency ratio, with the paper's 39x as the
reference line; for a search, its best point within 0.5 points of the baseline's
validation accuracy (the split that selects the front; its test accuracy is reported
next to it, not used to choose). Then where the bytes of the smallest such point go.
A benchmark, not a test: it asserts nothing.

    .venv/bin/python benchmarks/compression.py                    # seeds 0 1 2
    .venv/bin/python benchmarks/compression.py --seeds 0 --keep /tmp/compression
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
PAPER_RATIO = 1720 / 44  # Deep Compression, Table 1: LeNet-5, 1,720 KB -> 44 KB
WITHIN = 0.005  # 0.5 points of validation accuracy


def finished_search(workdir: Path, name: str) -> str | None:
    """The parent run id of a search of this name that already finished in ``workdir`` (a rerun with --keep goes on from there)."""
    if not (workdir / "mlflow.db").is_file():
        return None
    from netshrink.search.tracking import Tracker

    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment_id = tracker.experiment_id(name, create=False)
    record = tracker.latest_search(experiment_id) if experiment_id is not None else None
    return record.run_id if record is not None and record.status == "FINISHED" else None


def search(workdir: Path, experiment: Path, name: str, overrides: dict) -> str:
    """Run ``netshrink search`` on a copy of ``experiment`` renamed ``name``; returns its parent run id."""
    earlier = finished_search(workdir, name)
    if earlier is not None:
        print(f"  {name}: finished before, read back", flush=True)
        return earlier
    raw = yaml.safe_load(experiment.read_text())
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
    print(f"  {name}: {time.time() - started:.0f} s", flush=True)
    from netshrink.search.tracking import Tracker

    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}")
    return tracker.latest_search(tracker.experiment_id(name, create=False)).run_id


def front_of(workdir: Path, name: str, run_id: str):
    from netshrink.search.report import load_front

    return load_front(name, f"sqlite:///{workdir / 'mlflow.db'}", run_id)


def best_within(points, baseline):
    """The smallest point within 0.5 points of the baseline's validation accuracy, or None."""
    close = [p for p in points if p.accuracy >= baseline["accuracy"] - WITHIN]
    return min(close, key=lambda p: (p.size_bytes, -p.accuracy)) if close else None


def row(label: str, point, baseline) -> str:
    test = point.extra.get("test_accuracy", float("nan"))
    return (
        f"{label:<34} {point.size_bytes:>10,.0f} {baseline['size_bytes'] / point.size_bytes:>8.1f}x "
        f"{point.accuracy:>7.2%} {100 * (point.accuracy - baseline['accuracy']):>+6.2f} "
        f"{test:>7.2%} {100 * (test - baseline['test_accuracy']):>+6.2f} {baseline['latency_ms'] / point.latency_ms:>6.2f}x  {point.summary}"
    )


def breakdown(workdir: Path, point) -> None:
    from mlflow.tracking import MlflowClient

    from netshrink.techniques.artifact import byte_breakdown, read_artifact
    from netshrink.techniques.encoding import plan_layout

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    path = Path(client.download_artifacts(point.run_id, "compressed.safetensors", tempfile.mkdtemp()))
    parts = byte_breakdown(path)
    state, header = read_artifact(path)
    print(f"\nWhere the {path.stat().st_size:,} bytes of {point.name} go ({point.summary}):")
    print(f"  {'entry':<14} {'stored as':<26} {'density':>8} {'positions':>10} {'values':>9} {'codebooks':>10} {'bits/weight':>12}")
    totals = {"positions": 0, "values": 0, "codebooks": 0}
    for name, entry in header.entries.items():
        encoding = entry.encoding
        tensor = state[name]
        layout = plan_layout(tensor, encoding) if tensor.is_floating_point() else None
        what = f"{layout.value_format}, {layout.positions}" if layout else str(tensor.dtype)
        density = float((tensor != 0).float().mean()) if tensor.numel() else 0.0
        bytes_ = parts[name]
        for key in totals:
            totals[key] += bytes_[key]
        bits = 8 * sum(bytes_.values()) / max(tensor.numel(), 1)
        print(f"  {name:<14} {what:<26} {density:>8.1%} {bytes_['positions']:>10,} {bytes_['values']:>9,} {bytes_['codebooks']:>10,} {bits:>12.3f}")
    header_bytes = parts["header"]["header"]
    print(f"  {'total':<14} {'':<26} {'':>8} {totals['positions']:>10,} {totals['values']:>9,} {totals['codebooks']:>10,}")
    print(f"  header (safetensors' tensor table + netshrink's shapes, encodings, layouts and recipe): {header_bytes:,} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search.seed of each default search")
    parser.add_argument("--keep", type=Path, help="working folder to keep (default: a temporary one)")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="netshrink-compression-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    default = yaml.safe_load((ROOT / "spaces" / "digits.yaml").read_text())
    print(f"Machine: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {platform.platform()}")
    print(f"Budget: default search {default['search']['trials']} trials, {default['finetune']['epochs']} fine-tuning epochs each, "
          f"refine {default['refine']['count']} points x {default['refine']['epochs']} epochs; seeds {args.seeds}; folder {workdir}")
    print("Runs:", flush=True)
    # the recipe is fixed; its fine-tuning seed is search.seed, so it runs once per seed like the search
    recipe_runs = {
        seed: front_of(workdir, f"deep-compression-seed{seed}", search(workdir, ROOT / "benchmarks" / "deep_compression.yaml", f"deep-compression-seed{seed}", {"search": {"seed": seed}}))
        for seed in args.seeds
    }
    searches = {seed: front_of(workdir, f"default-seed{seed}", search(workdir, ROOT / "spaces" / "digits.yaml", f"default-seed{seed}", {"search": {"seed": seed}}))
                for seed in args.seeds}
    baseline = next(iter(recipe_runs.values())).baseline
    from netshrink.search.front import TrialPoint

    base_point = TrialPoint("", "baseline", baseline["accuracy"], baseline["size_bytes"], baseline["latency_ms"], "{}", "uncompressed",
                            {"test_accuracy": baseline["test_accuracy"]})
    print(f"\n{'':<34} {'bytes':>10} {'smaller':>9} {'val acc':>7} {'change':>6} {'test acc':>7} {'change':>6} {'faster':>7}")
    print(row("baseline (fp32, 30 epochs)", base_point, baseline))
    print(f"{'Deep Compression, paper (Caffe)':<34} {44_000:>10,} {PAPER_RATIO:>8.1f}x {'':>7} {'+0.00':>6}   (reference: 1,720 KB -> 44 KB, no loss)")
    for seed, loaded in recipe_runs.items():
        print(row(f"Deep Compression recipe, s{seed}", loaded.points[0], baseline))
    recipe_points = [loaded.points[0] for loaded in recipe_runs.values()]
    for split, key in (("validation", "accuracy"), ("test", "test_accuracy")):
        changes = [100 * (p.value(key) - baseline[key]) for p in recipe_points]
        print(f"Deep Compression recipe, {split} accuracy change over {len(changes)} seed(s): mean {statistics.fmean(changes):+.2f}, "
              f"std {statistics.pstdev(changes):.2f}, min {min(changes):+.2f}, max {max(changes):+.2f} points")
    ratios_dc = [baseline["size_bytes"] / p.size_bytes for p in recipe_points]
    print(f"Deep Compression recipe, size ratio: mean {statistics.fmean(ratios_dc):.1f}x, min {min(ratios_dc):.1f}x, max {max(ratios_dc):.1f}x")
    ratios = []
    best_points = []
    for seed, loaded in searches.items():
        best = best_within(loaded.points, baseline)
        if best is None:
            print(f"{f'default search, seed {seed}':<34} no point within 0.5 points")
            continue
        refined = sum(p.refined_from is not None for p in loaded.points)
        print(row(f"default search s{seed} ({len(loaded.points)} runs, {refined} refined)", best, baseline))
        ratios.append(baseline["size_bytes"] / best.size_bytes)
        best_points.append((seed, best))
    if ratios:
        spread = statistics.pstdev(ratios) if len(ratios) > 1 else 0.0
        print(f"\nDefault search, best size ratio within 0.5 points of validation accuracy over {len(ratios)} seed(s): "
              f"mean {statistics.fmean(ratios):.1f}x, std {spread:.1f}, min {min(ratios):.1f}x, max {max(ratios):.1f}x, median {statistics.median(ratios):.1f}x")
        tests = [100 * (p.extra["test_accuracy"] - baseline["test_accuracy"]) for _, p in best_points]
        print(f"Their test accuracy change: {', '.join(f'{t:+.2f}' for t in tests)} points")
        seed, smallest = min(best_points, key=lambda item: item[1].size_bytes)
        breakdown(workdir, smallest)
    breakdown(workdir, recipe_points[0])


if __name__ == "__main__":
    main()
