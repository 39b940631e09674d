"""MODEL_CARD.md of an exported model: what it is, how good, how big, how to load it.

The card travels with the files, far from MLflow, so it repeats the figures the
search measured next to the baseline's and tells how to run the model with the
smallest possible install (numpy and onnxruntime).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netshrink.config import TaskConfig

from .front import TrialPoint, format_metric, interval_kind, with_interval
from netshrink.deploy.onnx_export import EXIT_OUTPUT

FILE_ROLES = {
    "model.onnx": "ONNX model (opset 17; 21 where weights are stored as INT4), self-contained: runs with numpy and onnxruntime alone",
    "compressed.safetensors": "the compressed artifact the trial wrote, byte for byte: its size is the reported size; netshrink loads it back into PyTorch",
    "recipe.json": "the compression pipeline with every knob: what was applied, in order",
}


def file_role(name: str, slimmable: bool = False) -> str:
    if slimmable and name == "model.onnx":
        return "the ONNX graph of the widest width (opset 17), its weights in model.weights: runs with numpy and onnxruntime alone"
    if name in FILE_ROLES:
        return FILE_ROLES[name]
    if name == WEIGHTS_FILE:
        return "the weights of every width's graph, stored once (ONNX external data)"
    return "the ONNX graph of one width of the slimmable network (its weights in model.weights)"


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states; gathered by the export, rendered here."""

    experiment: str
    search_run_id: str
    point: TrialPoint
    pick: str  # how the trial was picked, in words ("as the knee of the front")
    baseline: dict[str, float]
    onnx_accuracy: float  # model.onnx on the validation split, measured at export
    files: dict[str, int]  # file name -> bytes on disk
    task: TaskConfig
    search_path: str  # the folder ``module:factory`` references import from
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # the ONNX model's inputs: (name, dtype, shape of one real sample)
    metric: str = "accuracy"  # the task's metric, by its name
    exit_cuts: tuple[str, ...] = ()  # early exits: the layer each exit follows, in forward order
    exit_threshold: float | None = None
    session_config: dict[str, str] = field(default_factory=dict)  # the ONNX Runtime session config model.onnx is deployed (and was timed) with
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> its SHA-256, as export wrote it
    forced: str = ""  # written with --force: why export would have refused it
    infeasible: str = ""  # picked by run id though it misses the search's constraints: which
    size_note: str | None = None  # why model.onnx and the artifact differ in size by more than 10% (``deploy.sizes``)
    widths: tuple[tuple[float, str, dict[str, float]], ...] = ()  # slimmable: (width, its graph's file, its figures), narrowest first
    onnx_file: str = "model.onnx"  # the graph of the picked point (a slimmable width's own graph)


def session_options_in_words(config: dict[str, str]) -> str:
    if config.get("session.disable_quant_qdq") == "1":
        return "session.disable_quant_qdq=1: the int8 weights are dequantized once, when the session loads; ONNX Runtime's defaults would do it on every call"
    return "ONNX Runtime's defaults"


def _ratio(baseline: float, value: float, better: str, worse: str) -> str:
    ratio = baseline / value
    return f"{ratio:.2f}x {better}" if ratio >= 1 else f"{1 / ratio:.2f}x {worse}"


def metrics_table(facts: CardFacts) -> str:
    point, base = facts.point, facts.baseline
    metrics = point.metrics()
    name = facts.metric
    test = metrics.get(f"test_{name}")
    rows = [
        "| | baseline | this model | change |",
        "|---|---:|---:|---:|",
        f"| {name}, validation split (selected this model) | {with_interval(base, name)} | {with_interval(metrics, name)} "
        f"| {100 * (point.accuracy - base[name]):+.2f} points |",
    ]
    if test is not None and f"test_{name}" in base:
        rows.append(
            f"| {name}, test split (held out: quote this) | {with_interval(base, f'test_{name}')} | {with_interval(metrics, f'test_{name}')} "
            f"| {100 * (test - base[f'test_{name}']):+.2f} points |"
        )
    rows += [
        f"| size (compressed artifact file) | {base['size_bytes']:,.0f} B | {point.size_bytes:,.0f} B | {_ratio(base['size_bytes'], point.size_bytes, 'smaller', 'larger')} |",
    ]
    if "onnx_bytes" in base and "onnx_bytes" in point.extra:
        shipped = "every width's ONNX graph and model.weights, the files that ship" if facts.widths else "model.onnx, the file that ships"
        rows.append(
            f"| size ({shipped}) | {base['onnx_bytes']:,.0f} B | {point.extra['onnx_bytes']:,.0f} B "
            f"| {_ratio(base['onnx_bytes'], point.extra['onnx_bytes'], 'smaller', 'larger')} |"
        )
    rows += [
        f"| latency (batch 1, ONNX Runtime CPU) | {base['latency_ms']:.4f} ms | {point.latency_ms:.4f} ms | {_ratio(base['latency_ms'], point.latency_ms, 'faster', 'slower')} |",
    ]
    if "latency_dequant_per_call_ms" in metrics:
        rows.append(
            f"| latency if the weights were dequantized on every call (ONNX Runtime's defaults) | {base['latency_ms']:.4f} ms "
            f"| {metrics['latency_dequant_per_call_ms']:.4f} ms | {_ratio(base['latency_ms'], metrics['latency_dequant_per_call_ms'], 'faster', 'slower')} |"
        )
    if "throughput" in metrics and "throughput" in base:
        rows.append(
            f"| throughput (batches, ONNX Runtime CPU) | {base['throughput']:,.0f} samples/s | {metrics['throughput']:,.0f} samples/s "
            f"| {_ratio(metrics['throughput'], base['throughput'], 'higher', 'lower')} |"
        )
    return "\n".join(rows)


def exit_labels(facts: CardFacts) -> list[str]:
    """What each value of the ``exit`` output means, by index."""
    return [f"the exit after `{cut}`" for cut in facts.exit_cuts] + ["the full network"]


def onnx_snippet(facts: CardFacts) -> str:
    arrays = "".join(
        f"{name} = np.zeros(({', '.join(str(size) for size in shape)}), dtype=np.{dtype})  # batch x ..., as the task's dataset yields it\n"
        for name, dtype, shape in ((_identifier(name), dtype, shape) for name, dtype, shape in facts.inputs)
    )
    feeds = ", ".join(f'"{name}": {_identifier(name)}' for name, _, _ in facts.inputs)
    run = (
        f'logits, exit_index = session.run(["logits", "{EXIT_OUTPUT}"], {{{feeds}}})\nprint(logits.argmax(axis=1), int(exit_index))'
        if facts.exit_cuts
        else f'logits = session.run(["logits"], {{{feeds}}})[0]\nprint(logits.argmax(axis=1))'
    )
    options = "".join(f'options.add_session_config_entry("{key}", "{value}")\n' for key, value in facts.session_config.items())
    return (
        "```python\n"
        "import numpy as np\n"
        "import onnxruntime as ort\n\n"
        "options = ort.SessionOptions()  # the options the latency above was measured with\n"
        f"{options}"
        "options.intra_op_num_threads = 1\n"
        f'session = ort.InferenceSession("{facts.onnx_file}", options, providers=["CPUExecutionProvider"])\n'
        f"{arrays}"
        f"{run}\n"
        "```"
    )


def _identifier(name: str) -> str:
    """An input name as a Python variable (``input_ids`` stays, ``pixel-values`` becomes ``pixel_values``)."""
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"x_{cleaned}"


def torch_snippet(facts: CardFacts) -> str:
    task = facts.task
    custom = ":" in task.dataset or ":" in task.model
    where = f", search_path={facts.search_path!r}" if custom else ""
    return (
        "```python\n"
        "from netshrink.tasks import build_model, load_data\n"
        "from netshrink.techniques import load_artifact\n\n"
        f"data = load_data({task.dataset!r}, {task.dataset_args!r}{where})\n"
        f"model = load_artifact('compressed.safetensors', build_model({task.model!r}, {task.model_args!r}, data{where})).model\n"
        "```"
    )


def widths_section(facts: CardFacts) -> list[str]:
    """A slimmable model's widths: one artifact, one graph per width over one weight file, the width chosen by the file opened."""
    name, base = facts.metric, facts.baseline
    picked = facts.point.extra.get("width")
    rows = [
        f"| width | graph | {name}, validation | {name}, test | latency ms | x faster than the baseline |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for width, file, figures in facts.widths:
        mark = " (picked)" if width == picked else ""
        rows.append(
            f"| {width:g}{mark} | `{file}` | {with_interval(figures, name)} | {with_interval(figures, f'test_{name}')} | "
            f"{figures['latency_ms']:.4f} | {base['latency_ms'] / figures['latency_ms']:.2f} |"
        )
    return [
        "## Widths",
        "",
        "This is a slimmable network: one set of weights that runs at each of these widths (the share of each layer's channels "
        "it keeps), chosen when it runs. Each width has its own ONNX graph; every graph reads the weights from the one file "
        f"`{WEIGHTS_FILE}`, which must stay beside them. The size above is the whole artifact's, which all widths share.",
        "",
        *rows,
        "",
        "Choose the width by the graph you open, with onnxruntime alone (keep the files together):",
        "",
        "```python\n"
        "import onnxruntime as ort\n\n"
        f'sessions = {{{", ".join(f"{w:g}: ort.InferenceSession({f!r})" for w, f, _ in facts.widths)}}}\n'
        f"session = sessions[{facts.widths[0][0]:g} if on_battery else {facts.widths[-1][0]:g}]  # e.g. the narrowest when the device saves power\n"
        "```",
        "",
    ]


WEIGHTS_FILE = "model.weights"


def render_card(facts: CardFacts) -> str:
    point = facts.point
    lines = [
        f"# {facts.experiment}: {point.name}",
        "",
        f"A compressed model found by netshrink: trial `{point.name}` (MLflow run `{point.run_id}`) of search "
        f"`{facts.search_run_id}` in experiment `{facts.experiment}`, picked {facts.pick}.",
        "",
        "## Metrics",
        "",
        metrics_table(facts),
        "",
        f"Measured by the search on the artifact the trial wrote. Brackets are 95% {interval_kind(facts.metric)}. The search "
        "picked its front on the validation split, so that figure is the best of many tries and optimistic; the test split "
        "played no part in the choice, which is why its figure is the one to quote. Size is the compressed artifact file's "
        "size; latency is batch-1 ONNX Runtime CPU time, timed in alternation with the baseline (ratio x the baseline's figure), "
        f"in the session options below ({session_options_in_words(facts.session_config)}). "
        f"`{facts.onnx_file}`, checked at export: {facts.metric} {format_metric(facts.metric, facts.onnx_accuracy)} on the validation split, one sample per call.",
    ]
    if facts.infeasible:
        lines += ["", f"**Warning, infeasible:** {facts.infeasible}. No trial of the search met its constraints; this one came closest or was chosen by hand."]
    if facts.forced:
        lines += ["", f"**Warning, exported with `--force`:** {facts.forced}. Trust the figure export measured, not the table."]
    shares = [point.extra[f"exit_share_{index}"] for index in range(len(facts.exit_cuts) + 1) if f"exit_share_{index}" in point.extra]
    if facts.exit_cuts and shares:
        where = ", ".join(f"{label} {share:.1%}" for label, share in zip(exit_labels(facts), shares))
        lines += [
            "",
            f"Early exits: share of the validation samples each exit answered: {where}. "
            "The latency is the mean over the validation set, each sample leaving where it does.",
        ]
    if facts.widths:
        lines += ["", *widths_section(facts)]
    lines += [
        "",
        "## Techniques",
        "",
        f"{point.summary or 'none'}",
        "",
        "`recipe.json` holds the whole pipeline, every knob included.",
        "",
        "## Files",
        "",
        "| file | bytes | SHA-256 | what it is |",
        "|---|---:|---|---|",
        *[f"| `{name}` | {size:,} | `{facts.sha256.get(name, '')}` | {file_role(name, bool(facts.widths))} |" for name, size in facts.files.items()],
        "",
        "Check that the files are the ones exported: `sha256sum model.onnx compressed.safetensors recipe.json` prints the hashes above.",
        "",
        "The search's size is the artifact's. `model.onnx` keeps 8-bit weights as int8 codes, 4/2/1-bit ones as INT4 "
        "codes, 16-bit ones as float16 and clustered ones as 4- or 8-bit indices into their layer's table; weights zeroed "
        "by unstructured pruning are dense there (ONNX Runtime's CPU kernels are dense). "
        + (facts.size_note + "." if facts.size_note else "The two files are within 10% of each other."),
        "",
        "## How to load",
        "",
        "With numpy and onnxruntime only (`pip install numpy onnxruntime`); the batch axis is dynamic:",
        "",
        onnx_snippet(facts),
    ]
    if facts.exit_cuts:
        meanings = "; ".join(f"{index} = {label}" for index, label in enumerate(exit_labels(facts)))
        lines += [
            "",
            f"The model has early exits: the second output, `{EXIT_OUTPUT}`, says which exit answered "
            f"({meanings}). A batch leaves at an exit only when every sample in it is confident "
            f"(top softmax probability at least {facts.exit_threshold}), so run one sample per call to get each "
            "sample's own exit, as the search measured it.",
        ]
    lines += [
        "",
        "Back into PyTorch, with netshrink installed (the architecture comes from the task's model factory, the weights "
        "and structural changes from the artifact):",
        "",
        torch_snippet(facts),
        "",
    ]
    return "\n".join(lines)
