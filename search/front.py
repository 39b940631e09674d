"""The Pareto front of finished trials, and how it is shown."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from rich.console import Console
from rich.table import Table

from .constraints import Constraints


@dataclass(frozen=True)
class TrialPoint:
    run_id: str
    name: str
    accuracy: float
    size_bytes: float
    latency_ms: float
    recipe: str  # the pipeline JSON
    summary: str  # the pipeline in one line
    extra: dict[str, float] = field(default_factory=dict)
    refined_from: str | None = None  # a refined run: the run id of the trial it fine-tuned longer
    metric_name: str = "accuracy"  # the task's metric, whose validation figure ``accuracy`` holds

    def value(self, objective: str) -> float:
        if objective == self.metric_name:
            return self.accuracy
        return getattr(self, objective) if objective in ("size_bytes", "latency_ms") else self.extra[objective]

    def metrics(self) -> dict[str, float]:
        """Every logged figure of the trial, the objectives included."""
        return {self.metric_name: self.accuracy, "size_bytes": self.size_bytes, "latency_ms": self.latency_ms, **self.extra}


WIDTH_KEY = "width"  # a slimmable trial's point: its width multiplier (``extra``); every width shares the trial's artifact


SHARED_NOTE = (
    "trial@w: the width w of a slimmable trial, one artifact that runs at each of its widths (the width chosen when it runs); "
    "its size (shared) is the whole artifact's, the same for every width of it"
)


def width_figures(metrics: dict[str, float]) -> list[tuple[float, dict[str, float]]]:
    """A slimmable trial's widths, narrowest first, each with its figures under the trial's own names (``accuracy``,
    ``test_accuracy``, ``latency_ms``, ...; ``size_bytes``: the one artifact's, which every width shares); [] for a trial
    that is not slimmable."""
    widths = sorted({float(key[len("width_"):].split("/", 1)[0]) for key in metrics if key.startswith("width_") and "/" in key})
    found = []
    for width in widths:
        prefix = f"width_{width:g}/"
        figures = {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}
        figures["size_bytes"] = metrics["size_bytes"]
        found.append((width, figures))
    return found


def operating_point(metrics: dict[str, float], constraints: Constraints | None) -> tuple[float, dict[str, float]] | None:
    """The width a slimmable trial is judged by where one number per objective is needed (the sampler, MO-ASHA): the
    narrowest width that meets the constraints, else the widest; None for a trial that is not slimmable."""
    widths = width_figures(metrics)
    if not widths:
        return None
    return next(((w, f) for w, f in widths if constraints is None or constraints.feasible(f)), widths[-1])


PROPORTIONS = ("accuracy", "top5")  # metrics that are shares of samples: shown in %, with Wilson intervals


def base_metric(name: str) -> str:
    """``f1_macro`` of ``test_f1_macro``, ``onnx_f1_macro``, ``baseline_f1_macro``."""
    for prefix in ("baseline_", "test_", "onnx_"):
        name = name.removeprefix(prefix)
    return name


def format_metric(name: str, value: float, digits: int = 2) -> str:
    """A metric's value as tables show it: a share of samples in %, any other metric as a number."""
    return f"{value:.{digits}%}" if base_metric(name) in PROPORTIONS else f"{value:.{digits + 2}f}"


def interval_kind(name: str) -> str:
    return "Wilson intervals" if base_metric(name) in PROPORTIONS else "seeded percentile bootstrap intervals"


def metric_of(points: Sequence[TrialPoint]) -> str:
    """The task's metric, as the points carry it (``accuracy`` for none)."""
    return next((point.metric_name for point in points), "accuracy")


def with_interval(metrics: dict[str, float], name: str) -> str:
    """``97.50% [95.3%, 98.7%]``: a metric and its logged 95% interval (``-`` where the run has no such figure)."""
    value = metrics.get(name)
    if value is None:
        return "-"
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    bracket = f" [{format_metric(name, low, 1)}, {format_metric(name, high, 1)}]" if low is not None and high is not None else ""
    return format_metric(name, value) + bracket


def accuracy_note(baseline: dict[str, float] | None, metric: str = "accuracy") -> str:
    """Which figure is which, and which to quote."""
    val = f" ({baseline['val_samples']:.0f} samples)" if baseline and "val_samples" in baseline else ""
    test = f" ({baseline['test_samples']:.0f} samples)" if baseline and "test_samples" in baseline else ""
    return (
        f"{metric}: the validation split{val} selected this front, so its best figures are optimistic; the test split{test} "
        f"played no part in the search: quote it. Brackets: 95% {interval_kind(metric)}"
    )


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere."""
    better = False
    for x, y, direction in zip(a, b, directions):
        if direction == "max":
            x, y = -x, -y
        if x > y:
            return False
        if x < y:
            better = True
    return better


def pareto_front(points: list[TrialPoint], objectives: list[str], directions: list[str], constraints: Constraints | None = None) -> list[TrialPoint]:
    """Non-dominated points, best accuracy first. Points that break ``constraints`` are not eligible."""
    eligible = [p for p in points if constraints is None or constraints.feasible(p.metrics())]
    values = [[p.value(o) for o in objectives] for p in eligible]
    front = [p for i, p in enumerate(eligible) if not any(dominates(values[j], values[i], directions) for j in range(len(eligible)) if j != i)]
    return sorted(front, key=lambda p: (-p.accuracy, p.size_bytes, p.latency_ms))  # ``accuracy``: the task's metric


CLOSEST = 5  # infeasible trials shown when no trial meets the constraints


def closest_to_feasible(points: list[TrialPoint], constraints: Constraints, objectives: list[str], directions: list[str], count: int = CLOSEST) -> list[TrialPoint]:
    """When no trial meets the constraints: the ``count`` trials that come closest, nearest first. They are the front of
    the infeasible trials (so none is worse than another everywhere), ordered by ``Constraints.shortfall``."""
    infeasible = [p for p in points if not constraints.feasible(p.metrics())]
    front = pareto_front(infeasible, objectives, directions)
    rest = [p for p in infeasible if p not in front]
    ordered = sorted(front, key=lambda p: constraints.shortfall(p.metrics())) + sorted(rest, key=lambda p: constraints.shortfall(p.metrics()))
    return ordered[:count]


def knee_order(front: list[TrialPoint], objectives: list[str]) -> list[TrialPoint]:
    """The front from its knee outwards: nearest the ideal corner first.

    Each objective is min-max normalised over the front to [0, 1], 0 being its
    best value there (an objective equal on the whole front is 0 everywhere);
    points are ordered by their Euclidean distance to the ideal corner where
    every objective is 0. Ties go to the more accurate point. Sizes and
    latencies count linearly, as the objectives the search optimised.
    """
    from netshrink.config import OBJECTIVES

    directions = {**OBJECTIVES, **{p.metric_name: "max" for p in front}}
    spans = {name: (min(p.value(name) for p in front), max(p.value(name) for p in front)) for name in objectives}

    def badness(point: TrialPoint, name: str) -> float:
        low, high = spans[name]
        if high == low:
            return 0.0
        scaled = (point.value(name) - low) / (high - low)
        return 1.0 - scaled if directions[name] == "max" else scaled

    return sorted(front, key=lambda p: (math.hypot(*(badness(p, name) for name in objectives)), -p.accuracy))


def knee_point(front: list[TrialPoint], objectives: list[str]) -> TrialPoint:
    """The balanced point of the front: the first of ``knee_order``."""
    return knee_order(front, objectives)[0]


def _size(num_bytes: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def series_together(points: list[TrialPoint]) -> list[TrialPoint]:
    """``points`` in their order, but each slimmable trial's widths in one run of rows, widest first, where its first
    width stands: one artifact reads as one series."""
    ordered: list[TrialPoint] = []
    placed: set[str] = set()
    for point in points:
        if WIDTH_KEY not in point.extra:
            ordered.append(point)
        elif point.run_id not in placed:
            placed.add(point.run_id)
            ordered += sorted((p for p in points if p.run_id == point.run_id and WIDTH_KEY in p.extra), key=lambda p: -p.extra[WIDTH_KEY])
    return ordered


def front_table(front: list[TrialPoint], baseline: dict[str, float] | None, title: str, misses: dict[str, list[str]] | None = None) -> Table:
    """The front as a table; ``misses`` (run id -> the constraints it breaks) adds that column, for infeasible trials."""
    table = Table(title=title, title_justify="left")
    batched = bool(baseline) and "throughput" in baseline  # the search measured throughput: show it
    metric = metric_of(front)
    columns = [
        ("trial", "left"), (f"val. {metric} [95% CI]", "right"), (f"test {metric} [95% CI]", "right"), ("size", "right"),
        ("x smaller", "right"), ("model.onnx", "right"), ("latency ms", "right"), ("x faster", "right"),
    ]
    if batched:
        columns.append(("samples/s", "right"))
    if misses is not None:
        columns.append(("misses", "left"))
    columns.append(("recipe", "left"))
    for column, justify in columns:
        table.add_column(column, justify=justify, overflow="fold")
    if baseline:
        throughput = [f"{baseline['throughput']:,.0f}"] if batched else []
        table.add_row(
            "baseline", with_interval(baseline, metric), with_interval(baseline, f"test_{metric}"), _size(baseline["size_bytes"]), "1.0",
            _size(baseline["onnx_bytes"]) if "onnx_bytes" in baseline else "-", f"{baseline['latency_ms']:.4f}", "1.0", *throughput,
            *([""] if misses is not None else []), "uncompressed", style="dim",
        )
    for point in series_together(front):
        smaller = f"{baseline['size_bytes'] / point.size_bytes:.1f}" if baseline else "-"
        faster = f"{baseline['latency_ms'] / point.latency_ms:.2f}" if baseline else "-"
        metrics = point.metrics()
        throughput = [f"{metrics['throughput']:,.0f}" if "throughput" in metrics else "-"] if batched else []
        rung = f" (rung {metrics['rung_index']:.0f}/{metrics['rung_of']:.0f})" if metrics.get("rung_index", 1) < metrics.get("rung_of", 1) else ""
        shared = " (shared)" if WIDTH_KEY in point.extra else ""  # a slimmable width: the one artifact of all its widths
        table.add_row(
            point.name + rung, with_interval(metrics, metric), with_interval(metrics, f"test_{metric}"), _size(point.size_bytes) + shared, smaller,
            _size(metrics["onnx_bytes"]) if "onnx_bytes" in metrics else "-", f"{point.latency_ms:.4f}", faster, *throughput,
            *(["; ".join(misses.get(point.run_id, []))] if misses is not None else []), point.summary,
        )
    return table


def print_front(
    front: list[TrialPoint], baseline: dict[str, float] | None, title: str, console: Console | None = None,
    closest: list[TrialPoint] | None = None, constraints: Constraints | None = None,
) -> None:
    """The front as a table with its footnote. With no feasible trial, the ``closest`` ones instead, marked infeasible, each
    with the constraints it misses (``constraints``), and how to export one."""
    console = console or Console()
    if not front and closest and constraints is not None:
        misses = {point.run_id: constraints.misses(point.metrics()) for point in closest}
        console.print(f"[yellow]No trial meets the constraints ({constraints.describe()}). The {len(closest)} closest, INFEASIBLE:[/yellow]")
        console.print(front_table(closest, baseline, title=f"{title}: closest to the constraints (infeasible)", misses=misses))
        console.print(f"Export one anyway with: netshrink export -e EXPERIMENT --pick RUN_ID (or a unique prefix of it, e.g. {closest[0].run_id[:8]}); it says it is infeasible.")
        return
    if not front:
        console.print("[yellow]No finished trial is on the front (none finished, or none reached the metric's floor).[/yellow]")
        return
    console.print(front_table(front, baseline, title))
    console.print(
        "size: bytes of the compressed artifact file; latency: batch-1 ONNX Runtime CPU time, each trial timed "
        f"in alternation with the baseline (ratio x baseline figure); {accuracy_note(baseline, metric_of(front))}"
    )
    if any(WIDTH_KEY in point.extra for point in front):
        console.print(SHARED_NOTE)


def front_json(front: list[TrialPoint], baseline: dict[str, float] | None, misses: dict[str, list[str]] | None = None) -> str:
    """The front as JSON: each point's figures under the metric's own name (``f1_macro``, ``test_f1_macro``). With
    ``misses`` (the closest trials of a search with no feasible one): each row says ``feasible: false`` and what it misses."""
    rows = []
    for point in front:
        name = point.metric_name
        row = asdict(point)
        del row["accuracy"], row["metric_name"]
        row = {"run_id": row.pop("run_id"), "name": row.pop("name"), "metric": name, name: point.accuracy, **row}
        row["recipe"] = json.loads(point.recipe)
        metrics = point.metrics()
        row["selection_split"] = "validation"  # the split the front was chosen on: the metric; test_<metric> is held out
        for key in (name, f"test_{name}"):
            if f"{key}_ci_low" in metrics:
                row[f"{key}_ci95"] = [metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"]]
        row[f"test_{name}"] = metrics.get(f"test_{name}")
        if baseline:
            row["size_ratio"] = baseline["size_bytes"] / point.size_bytes
            row["speedup"] = baseline["latency_ms"] / point.latency_ms
        if WIDTH_KEY in point.extra:
            row["shares_artifact"] = True  # a slimmable width: the size is the one artifact of all its widths
        row["feasible"] = misses is None
        if misses is not None:
            row["misses"] = misses.get(point.run_id, [])
        rows.append(row)
    return json.dumps(rows, indent=2)
