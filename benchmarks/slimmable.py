"""Dynamic width benchmark: one slimmable LeNet-5 against a separately compressed model per width.

On the built-in task (LeNet-5 on scikit-learn's digits at 28x28, its baseline trained once and cached in the working
folder), each configuration runs the way a trial runs it (``evaluate_recipe``: compress, fine-tune, write the artifact,
export it to ONNX, measure it as deployed: the metric on validation and test, latency at batch 1 timed in alternation
with the baseline's ONNX file):

- ``slimmable``: one network trained at the widths 0.25, 0.5, 0.75, 1.0 (the sandwich rule with in-place distillation),
  one artifact, one ONNX graph per width over one weight file;
- ``separate``: for each narrower width, its own model: channel pruning that keeps the same share of each layer's
  channels (ratio 1 - width), fine-tuned as long; the widest is the baseline itself.

Both fine-tune ``--epochs`` (the slimmable network's epoch trains every width drawn). It prints, per width and as mean and
spread over seeds, the test accuracy and its change from the baseline, the latency and the speedup over the widest
width, and the bytes that ship: the one slimmable artifact against the sum of the separate ones. Then the issue's
target: the widest within 1 point of the baseline's test accuracy, the narrowest at least 3x faster than the widest and
within 3 points. A benchmark, not a test: it asserts nothing.

    .venv/bin/python benchmarks/slimmable.py                       # seeds 0 1 2, 10 epochs
    .venv/bin/python benchmarks/slimmable.py --seeds 0 --epochs 3 --keep /tmp/slim
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (0.25, 0.5, 0.75, 1.0)


def spread(values: list[float], fmt: str) -> str:
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} +- {fmt.format(sd)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs of every model (default 10)")
    parser.add_argument("--keep", type=Path, help="working folder (the cached baseline); default: a temporary one")
    args = parser.parse_args()
    workdir = (args.keep or Path(tempfile.mkdtemp(prefix="netshrink-slimmable-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from evidence import default_experiment, make_setup

    from netshrink.deploy.evaluate import evaluate_recipe
    from netshrink.techniques import Pipeline, PruningConfig
    from netshrink.techniques.slimmable import SlimmableConfig, width_name

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    print(f"Machine: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}; seeds {args.seeds}; {args.epochs} epochs of fine-tuning; folder {workdir}")
    experiment, baseline = default_experiment(workdir)
    experiment = experiment.model_copy(update={"finetune": experiment.finetune.model_copy(update={"epochs": args.epochs})})
    base = baseline.metrics
    print(f"Baseline: test accuracy {base['test_accuracy']:.2%}, {base['size_bytes'] / 1e3:.1f} KB, {base['latency_ms']:.4f} ms at batch 1")

    slim: dict[float, list[dict]] = {w: [] for w in WIDTHS}
    separate: dict[float, list[dict]] = {w: [] for w in WIDTHS[:-1]}
    sizes: dict[str, list[float]] = {"slimmable": [], "separate": []}
    for seed in args.seeds:
        setup = make_setup(experiment, baseline, seed, early_stopping=False)
        with tempfile.TemporaryDirectory() as folder:
            metrics = evaluate_recipe(setup, Pipeline(steps=[SlimmableConfig(narrowest=WIDTHS[0], count=len(WIDTHS))]), Path(folder))
        sizes["slimmable"].append(metrics["size_bytes"])
        for width in WIDTHS:
            prefix = f"width_{width_name(width)}/"
            slim[width].append({key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)})
        total = base["size_bytes"]  # the widest of the separate models: the baseline itself
        for width in WIDTHS[:-1]:
            pipeline = Pipeline(steps=[PruningConfig(granularity="channel", ratio=1 - width)])
            with tempfile.TemporaryDirectory() as folder:
                metrics = evaluate_recipe(setup, pipeline, Path(folder))
            separate[width].append(metrics)
            total += metrics["size_bytes"]
        sizes["separate"].append(total)
        print(f"  seed {seed}: done", flush=True)

    widest = [m["latency_ms"] for m in slim[1.0]]
    print("\nPer width (mean +- spread over seeds; speedup: over the slimmable network's widest width, each seed's own):")
    print(f"  {'width':>5}  {'slimmable test acc':>20} {'chg (pt)':>14} {'latency ms':>18} {'speedup':>13}   {'separate test acc':>20} {'chg (pt)':>14} {'latency ms':>18} {'speedup':>13}")
    for width in WIDTHS:
        s = slim[width]
        row = (
            f"  {width:>5g}  {spread([m['test_accuracy'] for m in s], '{:.2%}'):>20} {spread([100 * (m['test_accuracy'] - base['test_accuracy']) for m in s], '{:+.2f}'):>14} "
            f"{spread([m['latency_ms'] for m in s], '{:.4f}'):>18} {spread([w / m['latency_ms'] for w, m in zip(widest, s)], '{:.2f}'):>13}"
        )
        if width in separate:
            p = separate[width]
            row += (
                f"   {spread([m['test_accuracy'] for m in p], '{:.2%}'):>20} {spread([100 * (m['test_accuracy'] - base['test_accuracy']) for m in p], '{:+.2f}'):>14} "
                f"{spread([m['latency_ms'] for m in p], '{:.4f}'):>18} {spread([w / m['latency_ms'] for w, m in zip(widest, p)], '{:.2f}'):>13}"
            )
        else:
            row += f"   {base['test_accuracy']:>20.2%} {'(baseline)':>14} {base['latency_ms']:>18.4f}"
        print(row)
    print(
        f"\nBytes that ship: one slimmable artifact {spread([b / 1e3 for b in sizes['slimmable']], '{:.1f}')} KB (every width) against "
        f"{spread([b / 1e3 for b in sizes['separate']], '{:.1f}')} KB for the baseline and the three separate models"
    )
    widest_drop = statistics.fmean(100 * (base["test_accuracy"] - m["test_accuracy"]) for m in slim[1.0])
    narrow_drop = statistics.fmean(100 * (base["test_accuracy"] - m["test_accuracy"]) for m in slim[WIDTHS[0]])
    speedup = statistics.fmean(w / m["latency_ms"] for w, m in zip(widest, slim[WIDTHS[0]]))
    print(
        f"\nTarget: widest within 1 point of the baseline's test accuracy: {widest_drop:+.2f} pt under it ({'met' if widest_drop <= 1 else 'missed'}); "
        f"narrowest at least 3x faster than the widest, within 3 points: {speedup:.2f}x, {narrow_drop:+.2f} pt under the baseline "
        f"({'met' if speedup >= 3 and narrow_drop <= 3 else 'missed'})"
    )


if __name__ == "__main__":
    main()
