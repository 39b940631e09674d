"""The measurements behind the default search: each technique alone across its range, the informed
start's combinations, and the fine-tuning curves that calibrate early stopping.

On the built-in task (LeNet-5 on scikit-learn's digits, ``spaces/digits.yaml``'s task and
fine-tuning), every pipeline is run the way a trial runs it (``evaluate_recipe``: compress,
fine-tune, write the artifact, reload it, export to ONNX, measure) but without Ray or MLflow,
once per seed (the fine-tuning seed), on one cached baseline. Five parts:

1. **ranges**: each technique alone over the values its default range spans;
   **combinations**: combinations considered for the informed start;
2. **start**: the informed start's points (``spaces/start.py``);
3. **refine**: pipelines that a trial's few epochs leave low (and two they do not), fine-tuned as a
   trial does, then for ``refine.epochs`` at ``finetune.lr`` and at ``refine.lr``: what refinement
   brings back, which is why ``refine.reach`` and ``refine.lr`` are set as they are;
4. **curves**: pipelines drawn at random from the default space (Optuna's RandomSampler),
   fine-tuned with no early stopping, their validation accuracy taken at every checkpoint.
   For each share of fine-tuning it prints the largest rise of validation accuracy from a
   checkpoint there to the end (``netshrink/deploy/stopping.py``'s ``RECOVERY``), and what the stop
   rule in force would have done: trials stopped, and trials stopped that would have ended
   at or above ``min_accuracy`` (wrong stops; the rule is meant to make none);
5. **floor**: how fast this network can get on ONNX Runtime at all. Distillation + channel pruning + 4 bits
   (the fastest family any search has found, the informed start's point 11) at ratios up to 0.97, where one conv1
   channel, one conv2 channel and fifteen fc1 units are left, and a one-node ``Identity`` graph (ONNX Runtime's own cost
   per call), each timed against the baseline as a trial times it (``measure_relative_latency``). Next
   to each: the useful hypervolume (``benchmarks/search_quality.py``) that one point with its size and
   latency would have *if it kept the baseline's accuracy*, ``(1 - 1 / size ratio) x (1 - latency ratio / 1.2)``:
   the most that any front reaching that speed could score.

For parts 1 to 3 it prints, per pipeline, the mean over seeds of the validation and test
accuracy change from the baseline (points), the size ratio and the speed-up, with the
spread (min to max) of the validation change. Accuracy: validation is the split that
selects a search's front, test is held out. It asserts nothing.

    .venv/bin/python benchmarks/evidence.py                       # every part, seeds 0 1 2, 60 random draws
    .venv/bin/python benchmarks/evidence.py --parts curves --draws 100 --seeds 0
    .venv/bin/python benchmarks/evidence.py --parts floor --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Part 1: each technique alone, over its default range (the values a search draws from)
RANGES: list[tuple[str, dict]] = [
    *[(f"pruning channel {r}", {"pruning": {"granularity": "channel", "ratio": r}}) for r in (0.2, 0.35, 0.5, 0.65, 0.8, 0.9)],
    *[(f"pruning weight layer {r}", {"pruning": {"granularity": "weight", "ratio": r, "scope": "layer"}}) for r in (0.5, 0.8, 0.9)],
    *[(f"pruning weight global {r} x2 steps", {"pruning": {"granularity": "weight", "ratio": r, "scope": "global", "steps": 2}}) for r in (0.8, 0.9, 0.95)],
    *[(f"quantization {b} bits", {"quantization": {"bits": b}}) for b in (16, 8, 4, 2, 1)],
    *[(f"quantization sensitivity avg {a}", {"quantization": {"allocation": "sensitivity", "average_bits": a}}) for a in (1.5, 2.5, 4.0)],
    *[(f"clustering {k} huffman", {"clustering": {"clusters": k, "huffman": True}}) for k in (4, 8, 16, 32)],
    *[(f"lowrank {f}", {"lowrank": {"rank_fraction": f}}) for f in (0.05, 0.08, 0.12, 0.2, 0.3, 0.5)],
    *[(f"separable {w}", {"separable": {"which": w}}) for w in ("last", "all_but_first", "all")],
    *[(f"early_exit {a} t={t}", {"early_exit": {"after": a, "threshold": t}}) for a in ("pool1", "pool2") for t in (0.6, 0.9, 0.99)],
]

# Combinations considered for the informed start (part 1b): the winners the issue saw, and pruning + low bits
COMBINATIONS: list[tuple[str, dict]] = [
    ("channel 0.3 + 1 bit", {"pruning": {"granularity": "channel", "ratio": 0.3, "importance": "l2"}, "quantization": {"bits": 1}}),
    ("channel 0.45 + 2 bits", {"pruning": {"granularity": "channel", "ratio": 0.45, "importance": "l2"}, "quantization": {"bits": 2}}),
    ("channel 0.5 + clustering 4 huffman", {"pruning": {"granularity": "channel", "ratio": 0.5}, "clustering": {"clusters": 4, "huffman": True}}),
    *[
        (f"weight global {r} x2 + {b} bits", {"pruning": {"granularity": "weight", "ratio": r, "scope": "global", "steps": 2}, "quantization": {"bits": b}})
        for r in (0.9, 0.95) for b in (2, 4)
    ],
    *[
        (f"weight global {r} x2 + clustering {k} huffman", {"pruning": {"granularity": "weight", "ratio": r, "scope": "global", "steps": 2}, "clustering": {"clusters": k, "huffman": True}})
        for r in (0.9, 0.95) for k in (4, 16)
    ],
    ("weight global 0.95 x2 + sensitivity avg 2", {"pruning": {"granularity": "weight", "ratio": 0.95, "scope": "global", "steps": 2}, "quantization": {"allocation": "sensitivity", "average_bits": 2.0}}),
    ("distill + weight global 0.95 x2 + 2 bits", {"distillation": {"temperature": 4.0, "alpha": 0.5}, "pruning": {"granularity": "weight", "ratio": 0.95, "scope": "global", "steps": 2}, "quantization": {"bits": 2}}),
    ("separable last + weight global 0.9 x2 + 2 bits", {"separable": {"which": "last"}, "pruning": {"granularity": "weight", "ratio": 0.9, "scope": "global", "steps": 2}, "quantization": {"bits": 2}}),
]


def fast_family(ratio: float) -> tuple[str, dict]:
    """Distillation + channel pruning at ``ratio`` + 4 bits: the fastest family found (the informed start's point 11 at 0.75)."""
    return f"distill + channel {ratio} + 4 bits", {
        "distillation": {"temperature": 4.0, "alpha": 0.5}, "pruning": {"granularity": "channel", "ratio": ratio, "importance": "l2"}, "quantization": {"bits": 4},
    }


# Part 3: refinement. Pipelines that a trial's few epochs leave low, and two that they do not, fine-tuned as a trial
# does, then for refine.epochs at finetune.lr and at refine.lr (spaces/digits.yaml)
REFINE: list[tuple[str, dict]] = [fast_family(r) for r in (0.75, 0.85)] + [
    ("channel 0.65 + 4 bits", {"pruning": {"granularity": "channel", "ratio": 0.65, "importance": "l2"}, "quantization": {"bits": 4}}),
    ("weight global 0.95 x2 + sensitivity avg 2", {"pruning": {"granularity": "weight", "ratio": 0.95, "scope": "global", "steps": 2}, "quantization": {"allocation": "sensitivity", "average_bits": 2.0}}),
    ("weight global 0.95 x2 + 2 bits", {"pruning": {"granularity": "weight", "ratio": 0.95, "scope": "global", "steps": 2}, "quantization": {"bits": 2}}),
]

# Part 5: the latency floor. The fastest family any search found, narrowed down to a channel or two per layer
FLOOR: list[tuple[str, dict]] = [fast_family(r) for r in (0.75, 0.85, 0.9, 0.95, 0.97)]
USEFUL_LATENCY = 1.2  # the useful box's latency edge, in baseline latencies (benchmarks/search_quality.py)


def pipeline_of(point: dict):
    from netshrink.techniques import REGISTRY, Pipeline

    order = list(REGISTRY)
    return Pipeline(steps=[REGISTRY[kind].config_type(**knobs) for kind, knobs in sorted(point.items(), key=lambda item: order.index(item[0]))])


def start_label(index: int, point: dict) -> str:
    """``3. quantization(uniform, 4)``: a start point in one short line."""
    parts = [f"{kind}({', '.join(str(value) for value in knobs.values())})" for kind, knobs in point.items()]
    return f"{index + 1}. {' + '.join(parts)}"[:44]


def default_experiment(workdir: Path):
    """The default experiment and its cached baseline (trained on first use; its latency measured once here)."""
    from netshrink.validation import load_experiment
    from netshrink.search.baseline import prepare_baseline

    experiment = load_experiment(ROOT / "spaces" / "digits.yaml")
    return experiment, prepare_baseline(experiment, workdir / ".netshrink" / "baselines", str(ROOT / "spaces"), log=lambda *_: None)


def make_setup(experiment, baseline, seed: int, early_stopping: bool):
    """A ``TrialSetup`` on the default experiment's baseline."""
    from netshrink.search.constraints import Constraints
    from netshrink.deploy.stopping import StopRule
    from netshrink.deploy.evaluate import RecipeSetup

    constraints = Constraints.for_search(None, None, None, baseline.metrics)
    return RecipeSetup(
        task=experiment.task, finetune=experiment.finetune, measure=experiment.measure, seed=seed, cpus=1, search_path=str(ROOT / "spaces"),
        baseline_weights=baseline.weights, baseline_metrics=baseline.metrics, sensitivity=baseline.sensitivity,
        stop_rule=StopRule(constraints.min_accuracy) if early_stopping else None,
    )


def evaluate(setup, pipeline) -> tuple[dict, list]:
    from netshrink.deploy.evaluate import evaluate_recipe

    curve: list = []
    with tempfile.TemporaryDirectory() as folder:
        metrics = evaluate_recipe(setup, pipeline, Path(folder), report=curve.append)
    return metrics, curve


def table(title: str, rows: list[tuple[str, dict]], setups: dict, out: list) -> None:
    print(f"\n{title}")
    print(f"  {'pipeline':<44} {'val chg (pt)':>13} {'[min, max]':>15} {'test chg':>9} {'x smaller':>10} {'x faster':>9}")
    for label, point in rows:
        pipeline = pipeline_of(point)
        results = []
        for seed, setup in setups.items():
            metrics, curve = evaluate(setup, pipeline)
            results.append(metrics)
            out.append({"part": title, "label": label, "seed": seed, "metrics": metrics, "curve": [c.__dict__ for c in curve]})
        base = next(iter(setups.values())).baseline_metrics
        val = [100 * (m["accuracy"] - base["accuracy"]) for m in results]
        test = [100 * (m["test_accuracy"] - base["test_accuracy"]) for m in results]
        print(
            f"  {label:<44} {statistics.fmean(val):>+13.2f} {f'[{min(val):+.1f}, {max(val):+.1f}]':>15} {statistics.fmean(test):>+9.2f} "
            f"{statistics.fmean(m['size_ratio'] for m in results):>9.1f}x {statistics.fmean(m['speedup'] for m in results):>8.2f}x",
            flush=True,
        )


def refine_tables(experiment, setups: dict, rows: list[tuple[str, dict]], out: list) -> None:
    """``rows`` fine-tuned as a trial does, then as refinement does at ``finetune.lr`` and at ``refine.lr``."""
    from dataclasses import replace

    finetune, refine = experiment.finetune, experiment.refine
    variants = {(finetune.epochs, finetune.lr): "as a trial", (refine.epochs, finetune.lr): "refined at finetune.lr"}
    variants.setdefault((refine.epochs, refine.lr or finetune.lr), "refined at refine.lr")
    for (epochs, lr), what in variants.items():
        tuned = {seed: replace(setup, finetune=setup.finetune.model_copy(update={"epochs": epochs, "lr": lr})) for seed, setup in setups.items()}
        table(f"Refine: {what}, {epochs} epochs at lr {lr:g}", rows, tuned, out)


def floor(experiment, setups: dict, baseline_onnx: Path, workdir: Path, out: list) -> None:
    """Part 5: the fastest this network runs on ONNX Runtime, and the useful hypervolume that caps."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from netshrink.deploy.measure import measure_relative_latency
    from netshrink.tasks import load_data

    def ceiling(size_ratio: float, latency_ratio: float) -> float:
        return (1 - 1 / size_ratio) * max(0.0, 1 - latency_ratio / USEFUL_LATENCY)

    print("\nFloor: the fastest this network gets on ONNX Runtime (batch 1, as a trial measures), and the useful hypervolume")
    print("of one point that fast if it kept the baseline's accuracy (the most any front reaching that speed could score)")
    print(f"  {'pipeline':<44} {'val chg (pt)':>13} {'x smaller':>10} {'latency (x baseline)':>21} {'[min, max]':>15} {'HV ceiling':>11}")
    base = next(iter(setups.values())).baseline_metrics
    for label, point in FLOOR:
        results = []
        for seed, setup in setups.items():
            metrics, _ = evaluate(setup, pipeline_of(point))
            results.append(metrics)
            out.append({"part": "floor", "label": label, "seed": seed, "metrics": metrics})
        latency = [1 / m["speedup"] for m in results]
        size = statistics.fmean(m["size_ratio"] for m in results)
        print(
            f"  {label:<44} {statistics.fmean(100 * (m['accuracy'] - base['accuracy']) for m in results):>+13.2f} {size:>9.1f}x "
            f"{statistics.fmean(latency):>21.3f} {f'[{min(latency):.3f}, {max(latency):.3f}]':>15} {ceiling(size, statistics.fmean(latency)):>11.3f}",
            flush=True,
        )
    sample = np.asarray(load_data(experiment.task.dataset, experiment.task.dataset_args).val[0][0], dtype=np.float32)[None]
    identity = workdir / "identity.onnx"
    shape = list(sample.shape)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), identity)
    timed = measure_relative_latency(identity, baseline_onnx, [{"input": sample}], experiment.measure)
    print(
        f"  {'one Identity node (no model at all)':<44} {'':>13} {'':>10} {timed.ratio:>21.3f} {'':>15} {ceiling(float('inf'), timed.ratio):>11.3f}"
        f"   ({timed.candidate.ms * 1000:.1f} us a call; the baseline {timed.reference.ms * 1000:.1f} us)",
        flush=True,
    )
    out.append({"part": "floor", "label": "identity", "latency_ratio": timed.ratio, "ms": timed.candidate.ms, "baseline_ms": timed.reference.ms})


def curves(experiment, setup, draws: int, seed: int, out: list) -> None:
    import optuna

    from netshrink.deploy.stopping import StopRule

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), directions=["maximize", "minimize"])
    records = []
    print(f"\nCurves: {draws} pipelines drawn at random from the default space (sampler seed {seed}), no early stopping")
    for index in range(draws):
        trial = study.ask()
        pipeline = experiment.space.sample(trial)
        study.tell(trial, [0.0, 0.0])
        if not pipeline.active_steps():
            continue
        metrics, curve = evaluate(setup, pipeline)
        records.append((metrics["accuracy"], curve))
        out.append({"part": "curves", "label": pipeline.describe(), "seed": setup.seed, "metrics": metrics, "curve": [c.__dict__ for c in curve]})
        print(f"  [{index + 1}/{draws}] final {metrics['accuracy']:.1%}  curve " + " ".join(f"{c.fraction:.2f}:{c.accuracy:.0%}" for c in curve), flush=True)
    base = setup.baseline_metrics["accuracy"]
    from netshrink.search.constraints import DEFAULT_DROP

    floor = setup.baseline_metrics["accuracy"] - DEFAULT_DROP
    from netshrink.deploy.stopping import RECOVERY

    shares = [share for share, _ in RECOVERY]
    print(f"\n  Largest rise of validation accuracy from a checkpoint to the end, by share of fine-tuning done ({len(records)} trials),")
    print("  next to the rise the stop rule assumes (netshrink/deploy/stopping.py's RECOVERY):")
    buckets = defaultdict(list)
    for final, curve in records:
        for point in curve:
            if point.fraction < 1.0:
                buckets[max(share for share in shares if share <= point.fraction + 1e-9)].append(final - point.accuracy)
    for share, assumed in RECOVERY:
        rises = buckets.get(share, [])
        seen = f"largest rise {max(rises):+.1%} over {len(rises)} checkpoints" if rises else "no checkpoint"
        print(f"    from {share:.2f}: {seen}; the rule assumes {assumed:+.1%}")
    rule = StopRule(floor)
    stopped = wrong = hopeless = early = 0
    for final, curve in records:
        at = next((point for point in curve if rule.reason(point)), None)
        hopeless += final < base - 0.10
        if at is not None:
            stopped += 1
            wrong += final >= floor
            early += final < base - 0.10 and at.fraction <= 0.25
    print(
        f"\n  The stop rule in force (min_accuracy {floor:.2%} = baseline - 5 pt): would stop {stopped} of {len(records)} trials; "
        f"{wrong} of them ended at or above min_accuracy (wrong stops). Trials ending below baseline - 10 pt: {hopeless}, "
        f"of which stopped within the first quarter of fine-tuning: {early}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    every = ["ranges", "combinations", "start", "refine", "curves", "floor"]
    parser.add_argument("--parts", nargs="+", default=every, choices=every)
    parser.add_argument("--match", help="only the ranges and combinations whose label contains this")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds for ranges and start")
    parser.add_argument("--draws", type=int, default=60, help="random pipelines for the curves")
    parser.add_argument("--keep", type=Path, help="working folder (baseline cache, evidence.json); default: a temporary one")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="netshrink-evidence-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    import netshrink

    print(f"Machine: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {platform.platform()}; netshrink {netshrink.__version__}")
    experiment, baseline = default_experiment(workdir)
    setups = {seed: make_setup(experiment, baseline, seed, early_stopping=False) for seed in args.seeds}
    base = setups[args.seeds[0]].baseline_metrics
    print(
        f"Baseline: validation {base['accuracy']:.2%}, test {base['test_accuracy']:.2%}, {base['size_bytes']:,.0f} bytes; "
        f"fine-tuning {experiment.finetune.epochs} epochs, lr {experiment.finetune.lr}; seeds {args.seeds}; folder {workdir}"
    )
    started = time.time()
    out: list = []
    chosen = lambda rows: [row for row in rows if args.match is None or args.match in row[0]]  # noqa: E731
    if "ranges" in args.parts:
        table("Ranges: each technique alone", chosen(RANGES), setups, out)
    if "combinations" in args.parts:
        table("Combinations considered for the informed start", chosen(COMBINATIONS), setups, out)
    if "start" in args.parts:
        from netshrink.spaces.start import INFORMED_START

        rows = [(start_label(index, point), point) for index, point in enumerate(INFORMED_START)]
        table("Start: the informed start's points", rows, setups, out)
    if "refine" in args.parts:
        refine_tables(experiment, setups, chosen(REFINE), out)
    if "curves" in args.parts:
        curves(experiment, setups[args.seeds[0]], args.draws, seed=args.seeds[0], out=out)
    if "floor" in args.parts:
        floor(experiment, setups, baseline.artifact.parent / "baseline.onnx", workdir, out)
    (workdir / "evidence.json").write_text(json.dumps(out, indent=1))
    print(f"\n{time.time() - started:.0f} s; every measurement in {workdir / 'evidence.json'}")


if __name__ == "__main__":
    main()
