"""Deployment benchmark: what each quantization buys where the model ships (ONNX Runtime, CPU).

For the built-in LeNet-5 (``spaces/digits.yaml``), the built-in ViT (``spaces/digits-vit.yaml``) and a Hugging Face
BERT (``benchmarks/bert.yaml``: ``benchmarks/user_models.py``'s, sequence length 64), on the
task's cached baseline (trained on first use), this evaluates through the real trial path
(``netshrink.deploy.evaluate_recipe``: compress, fine-tune ``finetune.epochs``, save the artifact, export the
ONNX file that ``netshrink export`` writes):

- ``fp32``: the baseline as exported;
- ``fp16``: ``quantization(bits=16)``;
- ``int8 weights``: ``quantization(bits=8)``, timed twice: as deployed (the file's recorded session option
  ``session.disable_quant_qdq=1``: weights folded once at load) and with ONNX Runtime's defaults
  (dequantized on every call);
- ``static int8``: ``quantization(bits=8, activations=int8)``: QDQ with uint8 activations, run with integer kernels;
- for BERT, ``fp32, ONNX Runtime transformer optimizer``: the fp32 file through ``onnxruntime.transformers.optimizer``
  (fused attention, skip layer norm, bias GELU), timed as the rest: whether the fusion pays on a CPU at batch 1;
- ``front``: the fastest point within 1 point of the baseline's validation accuracy on the front of a
  default search of that experiment (run here with the real CLI, or read from ``--from`` folders), exported
  with ``netshrink export``.

Per row: artifact bytes and size ratio against fp32's artifact, ONNX bytes, the batch-1 latency ratio and
the batch-``measure.batch_size`` throughput ratio against the fp32 ONNX file (each file timed in alternation
with it, in the session options its metadata records; ``measure`` settings of the experiment file), and the
ONNX model's accuracy on the validation and test splits. Then the operators in ONNX Runtime's optimized graph
of the static int8 model. A benchmark, not a test: it asserts nothing.

    .venv/bin/python benchmarks/deploy.py                          # both tasks, runs the two searches (~25 min)
    .venv/bin/python benchmarks/deploy.py --tasks lenet5 --from lenet5=/path/to/finished/search/folder
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"lenet5": ROOT / "spaces" / "digits.yaml", "vit": ROOT / "spaces" / "digits-vit.yaml", "bert": ROOT / "benchmarks" / "bert.yaml"}
TRANSFORMERS = {"bert": "bert"}  # task -> ONNX Runtime transformer optimizer's model_type: its fused-attention row
WITHIN = 0.01  # the front point: within 1 point of the baseline's validation accuracy


def recipes():
    from netshrink.techniques import Pipeline, QuantizationConfig

    return {
        "fp16": Pipeline(steps=[QuantizationConfig(bits=16)]),
        "int8 weights": Pipeline(steps=[QuantizationConfig(bits=8)]),
        "static int8": Pipeline(steps=[QuantizationConfig(bits=8, activations="int8")]),
    }


def _with_root_on_path() -> dict[str, str]:
    """The environment for the CLI: the repository root on PYTHONPATH (the bert task's benchmarks.user_tasks references)."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run_search(folder: Path, experiment_file: Path) -> None:
    (folder / "spaces").mkdir(parents=True, exist_ok=True)
    target = folder / "spaces" / experiment_file.name
    target.write_text(experiment_file.read_text())
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "netshrink.cli", "search", str(target.relative_to(folder))], cwd=folder, capture_output=True, text=True, env=_with_root_on_path()
    )
    (folder / "search.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"search {experiment_file.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"  search {experiment_file.name}: {time.time() - started:.0f} s", flush=True)


def front_point(folder: Path, experiment):
    """The fastest front point within 1 point of the baseline's validation accuracy, exported with the CLI."""
    from netshrink.search.report import load_front

    loaded = load_front(experiment.name, f"sqlite:///{folder / 'mlflow.db'}")
    close = [p for p in loaded.front if p.accuracy >= loaded.baseline["accuracy"] - WITHIN]
    if not close:
        return None, None
    point = min(close, key=lambda p: (p.latency_ms, -p.accuracy))
    out = folder / "deploy-front"
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-m", "netshrink.cli", "export", "-e", experiment.name, "--pick", point.run_id, "--out", str(out)],
        cwd=folder, capture_output=True, text=True, env=_with_root_on_path(),
    )
    if result.returncode != 0:
        sys.exit(f"export of {point.run_id} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return point, out


def measure_row(label: str, onnx_path: Path, artifact_bytes: int, reference: Path, task, experiment, fp32_bytes: int, config=None) -> dict:
    """``task``: the loaded task (its splits, its batch format: pairs or dicts, and its metric)."""
    from netshrink.deploy.measure import measure_relative_latency, onnx_evaluate

    settings = experiment.measure
    data, batches = task.data, task.batches
    feeds = batches.feeds(data.val)
    single = measure_relative_latency(onnx_path, reference, feeds, settings, config=config)  # as a trial times it
    batch = settings.batch_size
    batched = measure_relative_latency(onnx_path, reference, batches.feeds(data.val, batch, limit=batch), settings, config=config, batch=batch)
    return {
        "model": label,
        "artifact": artifact_bytes,
        "x smaller": fp32_bytes / artifact_bytes,
        "onnx": os.path.getsize(onnx_path),
        "latency": single.ratio,
        "throughput": 1.0 / batched.ratio,  # samples/s over the fp32 file's, same batches
        "val": onnx_evaluate(onnx_path, data.val, batches, task.metric).value,
        "test": onnx_evaluate(onnx_path, data.test, batches, task.metric).value,
    }


def optimized_ops(onnx_path: Path) -> list[str]:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
        counts: dict[str, int] = {}
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return [f"{op} x{n}" for op, n in sorted(counts.items())]


def bench_task(name: str, folder: Path, searched: bool) -> list[dict]:
    from netshrink.validation import load_experiment
    from netshrink.deploy.evaluate import ARTIFACT_FILE, ONNX_FILE, RecipeSetup, evaluate_recipe
    from netshrink.search.baseline import prepare_baseline
    from netshrink.tasks.task import load_task

    experiment_file = EXPERIMENTS[name]
    if not searched:
        run_search(folder, experiment_file)
    experiment = load_experiment(folder / "spaces" / experiment_file.name)
    search_path = str(folder / "spaces")
    baseline = prepare_baseline(experiment, folder / ".netshrink" / "baselines", search_path, log=lambda *a: print(" ", *a, flush=True))
    task = load_task(experiment.task, search_path)
    reference = baseline.artifact.parent / "baseline.onnx"
    fp32_bytes = baseline.artifact.stat().st_size
    setup = RecipeSetup(
        task=experiment.task, finetune=experiment.finetune, measure=experiment.measure, seed=experiment.search.seed, cpus=1,
        search_path=search_path, baseline_weights=baseline.weights, baseline_metrics=baseline.metrics,
        sensitivity=baseline.sensitivity,
    )
    rows = [measure_row("fp32", reference, fp32_bytes, reference, task, experiment, fp32_bytes)]
    static_onnx = None
    work = folder / "deploy-recipes"
    for label, pipeline in recipes().items():
        workdir = work / label.replace(" ", "-")
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        evaluate_recipe(setup, pipeline, workdir)
        print(f"  {name} {label}: {time.time() - started:.0f} s", flush=True)
        artifact, onnx_path = (workdir / ARTIFACT_FILE).stat().st_size, workdir / ONNX_FILE
        if label == "int8 weights":
            rows.append(measure_row("int8 weights, folded (as deployed)", onnx_path, artifact, reference, task, experiment, fp32_bytes))
            rows.append(measure_row("int8 weights, per call (ORT defaults)", onnx_path, artifact, reference, task, experiment, fp32_bytes, config={}))
        else:
            rows.append(measure_row(label, onnx_path, artifact, reference, task, experiment, fp32_bytes))
        if label == "static int8":
            static_onnx = onnx_path
    point, exported = front_point(folder, experiment)
    if point is None:
        print(f"  {name}: no front point within 1 point of the baseline", flush=True)
    else:
        label = f"front: {point.name}, {point.summary}"
        rows.append(measure_row(label, exported / ONNX_FILE, (exported / ARTIFACT_FILE).stat().st_size, reference, task, experiment, fp32_bytes))
    if name in TRANSFORMERS:
        fused = transformer_optimized(reference, TRANSFORMERS[name], experiment, folder)
        rows.append(measure_row("fp32, ONNX Runtime transformer optimizer (fused attention)", fused, fp32_bytes, reference, task, experiment, fp32_bytes))
        print(f"\n{name}: operators after ONNX Runtime's transformer optimizer: {', '.join(optimized_ops(fused))}", flush=True)
    print(f"\n{name}: ONNX Runtime's optimized graph of the static int8 model: {', '.join(optimized_ops(static_onnx))}", flush=True)
    return rows


def transformer_optimized(reference: Path, model_type: str, experiment, folder: Path) -> Path:
    """The fp32 baseline through ``onnxruntime.transformers.optimizer`` (Attention, SkipLayerNormalization, BiasGelu fusions)."""
    from onnxruntime.transformers import optimizer

    args = experiment.task.model_args
    optimized = optimizer.optimize_model(str(reference), model_type=model_type, num_heads=args["heads"], hidden_size=args["hidden_size"])
    path = folder / "deploy-recipes" / "fp32-transformer-optimizer.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(path))
    return path


def print_table(name: str, rows: list[dict], experiment_file: Path) -> None:
    from netshrink.validation import load_experiment

    measure = load_experiment(experiment_file).measure
    print(f"\n### {name}: ratios against the fp32 ONNX file; batch 1 latency, batch {measure.batch_size} throughput; "
          f"{measure.threads} thread(s), {measure.repeats} runs after {measure.warmup} warm-up, in alternation")
    print("| model | artifact bytes | x smaller | ONNX bytes | latency (x fp32, lower is faster) | throughput (x fp32, higher is better) | val acc | test acc |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['artifact']:,} | {r['x smaller']:.2f} | {r['onnx']:,} | {r['latency']:.2f} | {r['throughput']:.2f} | {100 * r['val']:.2f}% | {100 * r['test']:.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=sorted(EXPERIMENTS), default=["lenet5", "vit", "bert"])
    parser.add_argument("--from", dest="sources", nargs="*", default=[], metavar="TASK=FOLDER",
                        help="a folder where `netshrink search` of that task's experiment already ran (its spaces/ copy, mlflow.db, baseline cache)")
    parser.add_argument("--keep", type=Path, help="working folder for tasks without --from (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # the bert task's module:factory references (benchmarks.user_tasks)
    sources = dict(source.split("=", 1) for source in args.sources)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    from netshrink import __version__

    print(f"Machine: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {platform.platform()}; netshrink {__version__}")
    print("Seed: each experiment file's search.seed; fine-tuning: its finetune settings; sizes in bytes of the files")
    base = args.keep or Path(tempfile.mkdtemp(prefix="netshrink-deploy-"))
    for name in args.tasks:
        folder = Path(sources[name]) if name in sources else base / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = bench_task(name, folder, searched=name in sources)
        print_table(name, rows, folder / "spaces" / EXPERIMENTS[name].name)


if __name__ == "__main__":
    main()
