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
within 3 points.

Last, the ONNX layout (``--layouts``, on the first seed's network): the two ways to run a width chosen at run time,
each width timed at batch 1 in alternation between them (ONNX Runtime, 1 thread):

- ``graph per width``: what netshrink ships, one graph per width over one shared weight file (``slimmable_export``);
- ``width input``: one graph with a ``width`` input (an index) and an ``If`` per width over the same initializers.

A benchmark, not a test: it asserts nothing.

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
    return f"{fmt.format(statistics.fmean(values))} +- {fmt.replace('+', '').format(sd)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs of every model (default 10)")
    parser.add_argument("--keep", type=Path, help="working folder (the cached baseline); default: a temporary one")
    parser.add_argument("--layouts", action=argparse.BooleanOptionalAction, default=True, help="also time the two ONNX layouts (default on)")
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
    first_artifact: Path | None = None
    separate: dict[float, list[dict]] = {w: [] for w in WIDTHS[:-1]}
    sizes: dict[str, list[float]] = {"slimmable": [], "separate": []}
    for seed in args.seeds:
        setup = make_setup(experiment, baseline, seed, early_stopping=False)
        with tempfile.TemporaryDirectory() as folder:
            metrics = evaluate_recipe(setup, Pipeline(steps=[SlimmableConfig(narrowest=WIDTHS[0], count=len(WIDTHS))]), Path(folder))
            if first_artifact is None:
                first_artifact = workdir / "slimmable.safetensors"
                first_artifact.write_bytes((Path(folder) / "compressed.safetensors").read_bytes())
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

    if args.layouts and first_artifact is not None:
        layouts(first_artifact, experiment)


def layouts(artifact: Path, experiment, repeats: int = 2000, rounds: int = 5) -> None:
    """Each width of the slimmable network in ``artifact``, timed at batch 1 as one graph per width over a shared weight
    file and as one graph with a width input, in alternation (``rounds`` of ``repeats`` calls each, the median round)."""
    import time

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from netshrink.deploy.onnx_export import export_module
    from netshrink.deploy.slimmable_export import export_widths, fold_index_arithmetic, width_path
    from netshrink.tasks.task import load_task
    from netshrink.techniques import load_artifact
    from netshrink.techniques.slimmable import WidthView, attached, find_slimmable

    task = load_task(experiment.task, str(ROOT / "spaces"))
    example = task.example()
    net = attached(find_slimmable(load_artifact(artifact, task.build_model()).model), example)
    folder = Path(tempfile.mkdtemp(prefix="netshrink-layouts-"))
    export_widths(net, example, folder / "model.onnx", {})
    graphs = []
    for index in range(len(net.widths)):
        graph = export_module(WidthView(net, index, example).eval(), example, ["logits"], {}, wrapped=True, fold_constants=False)
        fold_index_arithmetic(graph)
        graphs.append(graph)
    shared = {init.name: init for init in graphs[-1].graph.initializer}

    def branch(graph: onnx.ModelProto, index: int) -> onnx.GraphProto:
        outer = {value.name for value in graph.graph.input} | set(shared)
        rename = lambda name: name if (not name or name in outer) else f"w{index}/{name}"  # noqa: E731
        nodes, inner = [], [init for init in graph.graph.initializer if init.name not in shared]
        for node in graph.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            del copy.input[:], copy.output[:]
            copy.input.extend(rename(n) for n in node.input)
            copy.output.extend(rename(n) for n in node.output)
            copy.name = f"w{index}/{node.name}"
            nodes.append(copy)
        for init in inner:
            init.name = rename(init.name)
        return helper.make_graph(nodes, f"width{index}", [], [helper.make_tensor_value_info(rename("logits"), TensorProto.FLOAT, None)], initializer=inner)

    def chain(index: int) -> onnx.GraphProto:
        if index == len(graphs) - 1:
            return branch(graphs[index], index)
        nodes = [
            helper.make_node("Constant", [], [f"c{index}"], value=helper.make_tensor(f"c{index}v", TensorProto.INT64, [], [index])),
            helper.make_node("Equal", ["width", f"c{index}"], [f"is{index}"]),
            helper.make_node("If", [f"is{index}"], [f"out{index}"], then_branch=branch(graphs[index], index), else_branch=chain(index + 1)),
        ]
        return helper.make_graph(nodes, f"chain{index}", [], [helper.make_tensor_value_info(f"out{index}", TensorProto.FLOAT, None)])

    top = chain(0)
    inputs = [*graphs[-1].graph.input, helper.make_tensor_value_info("width", TensorProto.INT64, [])]
    main = helper.make_graph(list(top.node), "slimmable", inputs, [helper.make_tensor_value_info("out0", TensorProto.FLOAT, None)], initializer=list(shared.values()))
    single = helper.make_model(main, opset_imports=graphs[-1].opset_import)
    onnx.save(single, folder / "width_input.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    one = ort.InferenceSession(str(folder / "width_input.onnx"), options, providers=["CPUExecutionProvider"])
    sample = task.batches.feeds(task.data.val)[0]
    print(f"\nONNX layouts (batch 1, 1 thread, median of {rounds} alternating rounds of {repeats} calls; first seed's network):")
    print(f"  {'width':>5} {'graph per width (ms)':>21} {'width input (ms)':>17} {'ratio':>7}")
    for index, width in enumerate(net.widths):
        per_width = ort.InferenceSession(str(width_path(folder / "model.onnx", width)), options, providers=["CPUExecutionProvider"])
        feeds = (per_width, sample), (one, {**sample, "width": np.array(index, dtype=np.int64)})
        expected = per_width.run(None, sample)[0]
        assert np.allclose(one.run(None, feeds[1][1])[0], expected, atol=1e-5)
        times: list[list[float]] = [[], []]
        for session, feed in feeds:
            for _ in range(200):
                session.run(None, feed)
        for _ in range(rounds):
            for slot, (session, feed) in enumerate(feeds):
                started = time.perf_counter()
                for _ in range(repeats):
                    session.run(None, feed)
                times[slot].append(1e3 * (time.perf_counter() - started) / repeats)
        a, b = (statistics.median(t) for t in times)
        print(f"  {width:>5g} {a:>21.4f} {b:>17.4f} {b / a:>7.2f}")
    sizes = sum(f.stat().st_size for f in folder.glob("model*"))
    print(f"  files: graph per width {sizes:,} B in all; width input {(folder / 'width_input.onnx').stat().st_size:,} B")


if __name__ == "__main__":
    main()
