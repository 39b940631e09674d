"""Pictures of a search: the Pareto front (PNG, and HTML with hover) and the front's hypervolume history (PNG),
written to a folder, logged into the search's MLflow run, or drawn again from MLflow for ``netshrink front --plot``.

Drawn with matplotlib's object API (``Figure``, never pyplot), which renders PNG through Agg and
touches no global backend state, so it is safe in the driver of a Ray search. The HTML page is the
same figure saved as SVG, with a ``<title>`` on every point that browsers show on hover: one
drawing for both files, no JavaScript, nothing fetched, about 40 KB plus half a KB per trial.
Plotly would add zoom and richer tooltips, but a self-contained plotly page inlines about 4.8 MB of
JavaScript, and it would be a second drawing of the same data to keep in step with the PNG.
"""

from __future__ import annotations

import html
import io
import re
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import LogFormatter, MaxNLocator, PercentFormatter


from .front import PROPORTIONS, WIDTH_KEY, TrialPoint, base_metric, format_metric, metric_of, with_interval
from .hypervolume import BOX_OVER_BASELINE, front_hypervolume, hypervolume_history
from .report import LoadedFront
from .tracking import Tracker

ARTIFACT_FOLDER = "plots"  # in the search's parent run
HYPERVOLUME_METRIC = "hypervolume"  # the front's hypervolume after each trial, as a metric history of the search's run
PARETO_PNG = "pareto.png"
PARETO_HTML = "pareto.html"
HYPERVOLUME_PNG = "hypervolume.png"
DPI = 120

TRIAL_STYLE = {"s": 28, "color": "#c8c8c8", "edgecolors": "#808080", "linewidths": 0.6, "zorder": 2}
FRONT_STYLE = {"s": 46, "color": "tab:blue", "edgecolors": "black", "linewidths": 0.8, "zorder": 3}
BASELINE_STYLE = {"s": 190, "marker": "*", "color": "tab:red", "edgecolors": "black", "linewidths": 0.6, "zorder": 4}


def write_plots(
    folder: Path,
    points: Sequence[TrialPoint],
    front: Sequence[TrialPoint],
    baseline: dict[str, float],
    objectives: Sequence[str],
    min_accuracy: float | None = None,
) -> list[float]:
    """Write ``pareto.png``, ``pareto.html`` and ``hypervolume.png`` into ``folder``.

    ``points`` are all finished trials, in any order: the history follows the order Optuna started
    them, read from the trial number in each run name (``trial-007``). Returns that history, so the
    caller can log the same numbers the picture shows.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ordered = sorted(points, key=lambda point: _natural_key(point.name))
    history = hypervolume_history(ordered, objectives, baseline, min_accuracy)
    pareto, tooltips = pareto_figure(ordered, front, baseline, objectives, min_accuracy)
    pareto.savefig(folder / PARETO_PNG, dpi=DPI)
    (folder / PARETO_HTML).write_text(hoverable_html(pareto, tooltips, title="netshrink: Pareto front"), encoding="utf-8")
    baseline_volume = front_hypervolume([_baseline_point(baseline, metric_of(points))], objectives, baseline, min_accuracy)
    hypervolume_figure(history, baseline_volume, objectives, min_accuracy, metric_of(points)).savefig(folder / HYPERVOLUME_PNG, dpi=DPI)
    return history


def log_plots(
    tracker: Tracker,
    run_id: str,
    points: Sequence[TrialPoint],
    front: Sequence[TrialPoint],
    baseline: dict[str, float],
    objectives: Sequence[str],
    min_accuracy: float | None = None,
) -> None:
    """Put the pictures under ``plots/`` in the search's run, and the hypervolume as a metric with one step per trial.

    MLflow shows a metric's last step as its value, so ``hypervolume`` reads as the final one.
    """
    with tempfile.TemporaryDirectory() as folder:
        history = write_plots(Path(folder), points, front, baseline, objectives, min_accuracy)
        tracker.client.log_artifacts(run_id, folder, ARTIFACT_FOLDER)
    tracker.log_history(run_id, HYPERVOLUME_METRIC, history)


def write_search_plots(folder: Path, loaded: LoadedFront) -> list[float]:
    """``write_plots`` for a search read back from MLflow, with its objectives and ``min_accuracy``."""
    constraints = loaded.search.constraints
    return write_plots(folder, loaded.points, loaded.front, loaded.baseline, loaded.search.objectives, constraints.min_accuracy if constraints else None)


STRIP = 0.25  # height of the strip for points under the accuracy axis, as a share of the axis' span
BELOW_BASELINE = 0.10  # without min_accuracy, the accuracy axis starts 10 points under the baseline
BELOW_STYLE = {"s": 22, "marker": "v", "color": "#e0e0e0", "edgecolors": "#909090", "linewidths": 0.6, "zorder": 2}


SERIES_STYLE = {"color": "#2b8cbe", "linewidth": 1.0, "alpha": 0.7, "zorder": 1, "marker": None}


def width_series(points: Sequence[TrialPoint]) -> list[list[TrialPoint]]:
    """The points of each slimmable trial, narrowest width first (trials of one point are no series)."""
    runs: dict[str, list[TrialPoint]] = {}
    for point in points:
        if WIDTH_KEY in point.extra:
            runs.setdefault(point.run_id, []).append(point)
    return [sorted(series, key=lambda p: p.extra[WIDTH_KEY]) for series in runs.values() if len(series) > 1]


def accuracy_window(points: Sequence[TrialPoint], baseline: dict[str, float], min_accuracy: float | None) -> tuple[float, float]:
    """The accuracy axis: from just under ``min_accuracy`` (else the baseline minus 10 points) to just over the best."""
    metric = metric_of(points)
    floor = (min_accuracy if min_accuracy is not None else baseline[metric] - BELOW_BASELINE) - 0.01
    top = max([baseline[metric], *(point.accuracy for point in points)])
    return floor, top + max(0.1 * (top - floor), 0.002)


def pareto_figure(
    points: Sequence[TrialPoint],
    front: Sequence[TrialPoint],
    baseline: dict[str, float],
    objectives: Sequence[str],
    min_accuracy: float | None = None,
) -> tuple[Figure, dict[str, str]]:
    """Accuracy against size and against latency; returns the figure and a tooltip per point's SVG id.

    The accuracy axis covers the useful region (``accuracy_window``); trials under it are drawn
    in a shaded strip at the bottom, at their true size and latency, with their true accuracy on
    hover. Front labels are placed so that none overlaps another (``place_labels``). Every point is
    its own artist so that the SVG has one group per point to hang a tooltip on.
    """
    figure = Figure(figsize=(11, 5.5), layout="constrained")
    by_size, by_latency = figure.subplots(1, 2, sharey=True)
    on_front = {(point.run_id, point.name) for point in front}  # a slimmable trial has a point per width, under one run
    tooltips: dict[str, str] = {}
    metric = metric_of(points)
    floor, top = accuracy_window(points, baseline, min_accuracy)
    strip_center = floor - STRIP * (top - floor) / 2
    below = [point for point in points if point.accuracy < floor]
    panels = (
        (by_size, "size", lambda p: p.size_bytes / 1e3, "size of the compressed model file (KB, log scale)"),
        (by_latency, "latency", lambda p: p.latency_ms, "batch-1 ONNX Runtime latency on CPU (ms)"),
    )
    labels: dict[str, list[tuple[str, float, float]]] = {}
    for axes, panel, x_of, x_label in panels:
        legend: dict[str, object] = {}
        for index, point in enumerate(points):
            is_front = (point.run_id, point.name) in on_front
            under = point.accuracy < floor
            label = "Pareto front" if is_front else f"{len(below)} under {format_metric(metric, floor, 1)} (in the grey strip)" if under else "other finished trials"
            x = x_of(point)
            style = FRONT_STYLE if is_front else BELOW_STYLE if under else TRIAL_STYLE
            artist = axes.scatter([x], [strip_center if under else point.accuracy], **style)
            artist.set_gid(f"point-{panel}-{index}")
            tooltips[f"point-{panel}-{index}"] = _tooltip(point, baseline, is_front)
            legend.setdefault(label, artist)
            if is_front and not under:
                labels.setdefault(panel, []).append((point.name, x, point.accuracy))
        for series in width_series(points):  # a slimmable artifact's widths: one connected series
            line = axes.plot([x_of(p) for p in series], [strip_center if p.accuracy < floor else p.accuracy for p in series], **SERIES_STYLE)[0]
            legend.setdefault("widths of one slimmable artifact", line)
        base_x = baseline["size_bytes"] / 1e3 if panel == "size" else baseline["latency_ms"]
        artist = axes.scatter([base_x], [baseline[metric]], **BASELINE_STYLE)
        artist.set_gid(f"point-{panel}-baseline")
        tooltips[f"point-{panel}-baseline"] = _tooltip(_baseline_point(baseline, metric), baseline, False)
        legend["baseline (uncompressed)"] = artist
        axes.axhspan(floor - STRIP * (top - floor), floor, color="#f2f2f2", zorder=0)
        if min_accuracy is not None:
            legend[f"min_{metric} {format_metric(metric, min_accuracy, 1)}"] = axes.axhline(min_accuracy, color="grey", linestyle="--", linewidth=1)
        axes.set_xlabel(x_label)
        axes.grid(True, alpha=0.3)
        axes.set_ylim(floor - STRIP * (top - floor), top)
        if panel == "size":
            axes.set_xscale("log")
            axes.xaxis.set_major_formatter(LogFormatter())  # 40, 60, 100 rather than 4x10^1
            axes.xaxis.set_minor_formatter(LogFormatter())
    by_size.set_ylabel(f"validation {metric}")
    if base_metric(metric) in PROPORTIONS:  # a share of samples reads in %; another metric as the number it is
        by_size.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    by_latency.legend(list(legend.values()), list(legend.keys()), loc="lower right", fontsize=8)  # the last panel's artists
    title = f"Pareto front over {', '.join(objectives)}: {len(front)} of {len(points)} finished trials"
    if len(objectives) > 2:
        title += "\n(the front is taken over all objectives at once, so a front point can look dominated in one panel)"
    figure.suptitle(title, fontsize=10)
    for axes, panel, *_ in panels:  # once the layout is final
        base_x = baseline["size_bytes"] / 1e3 if panel == "size" else baseline["latency_ms"]
        place_labels(figure, axes, labels.get(panel, []), markers=[(base_x, baseline[metric])])
    return figure, tooltips


def place_labels(figure: Figure, axes, labels: list[tuple[str, float, float]], markers: Sequence[tuple[float, float]] = (), fontsize: float = 7) -> list:
    """Annotate each point with its name, moving a label up or down (with a leader line) until it stays inside the
    axes and overlaps neither a label placed before it nor a marker at ``markers`` (the front's points are markers
    too); labels are placed from the top down. Returns the text artists."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()  # the layout engine fixes the axes' positions; extents are measured on that layout
    renderer = canvas.get_renderer()
    radius = 5.0  # display pixels around a marker's center
    centers = [axes.transData.transform((x, y)) for x, y in [*markers, *((x, y) for _, x, y in labels)]]
    placed, boxes = [], [Bbox.from_extents(cx - radius, cy - radius, cx + radius, cy + radius) for cx, cy in centers]
    for name, x, y in sorted(labels, key=lambda label: -label[2]):
        for shift in _shifts():
            text, box = _label(axes, renderer, name, x, y, shift, fontsize)
            inside = axes.bbox.x0 <= box.x0 and box.x1 <= axes.bbox.x1 and axes.bbox.y0 <= box.y0 and box.y1 <= axes.bbox.y1
            if inside and not any(box.overlaps(other) for other in boxes):
                break
            text.remove()
        else:  # no free place within reach: at the point, overlapping
            text, box = _label(axes, renderer, name, x, y, 0.0, fontsize)
        boxes.append(box)
        placed.append(text)
    return placed


def _label(axes, renderer, name: str, x: float, y: float, shift: float, fontsize: float):
    text = axes.annotate(
        name, (x, y), xytext=(4, 4 + shift), textcoords="offset points", fontsize=fontsize,
        arrowprops={"arrowstyle": "-", "color": "#909090", "linewidth": 0.5} if shift else None,
    )
    text.update_positions(renderer)
    return text, Text.get_window_extent(text, renderer).expanded(1.05, 1.15)  # the words, not the leader line


def _shifts(step: float = 9.0, tries: int = 24):
    """Vertical offsets in points: 0, then one label height up, down, two up, two down, ..."""
    yield 0.0
    for k in range(1, tries):
        yield k * step
        yield -k * step


def hypervolume_figure(
    history: Sequence[float],
    baseline_volume: float,
    objectives: Sequence[str],
    min_accuracy: float | None = None,
    metric: str = "accuracy",
) -> Figure:
    """The front's hypervolume after each finished trial, with the trials that grew it marked."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    trials = list(range(1, len(history) + 1))
    axes.step(trials, history, where="post", color="tab:blue", label="front of the trials so far")
    grew = [i for i, value in enumerate(history) if value > (history[i - 1] if i else 0.0)]
    axes.scatter([trials[i] for i in grew], [history[i] for i in grew], color="tab:blue", edgecolors="black", zorder=3, label="trial that grew it")
    axes.axhline(baseline_volume, color="tab:red", linestyle="--", linewidth=1, label="the baseline alone")
    axes.set_ylim(bottom=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("finished trials, in the order Optuna started them")
    axes.set_ylabel("hypervolume (share of the reference box)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    corner = {
        metric: f"{metric} {min_accuracy or 0:.2g}",
        "size_bytes": f"{BOX_OVER_BASELINE:g}x baseline size",
        "onnx_bytes": f"{BOX_OVER_BASELINE:g}x baseline model.onnx size",
        "latency_ms": f"{BOX_OVER_BASELINE:g}x baseline latency",
        "throughput": f"1/{BOX_OVER_BASELINE:g} of the baseline's throughput",
    }
    axes.set_title(
        f"Hypervolume of the Pareto front over {', '.join(objectives)}\n"
        f"reference point: {', '.join(corner[name] for name in objectives)}",
        fontsize=10,
    )
    return figure


def hoverable_html(figure: Figure, tooltips: dict[str, str], title: str) -> str:
    """A standalone page with ``figure`` inlined as SVG; each group ``tooltips`` names gets a hover title."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # real text, not glyph outlines
        figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # the XML prolog and doctype are not allowed inside HTML
    svg = re.sub(
        r'<g id="([^"]+)">',
        lambda match: match.group(0) + (f"<title>{html.escape(tooltips[match.group(1)])}</title>" if match.group(1) in tooltips else ""),
        svg,
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n"
        "<style>body { font-family: sans-serif; margin: 1em; } svg { max-width: 100%; height: auto; } "
        'g[id^="point-"] { cursor: help; }</style>\n'
        "</head>\n<body>\n<p>Hover over a point for its trial, recipe and measurements.</p>\n"
        f"{svg}\n</body>\n</html>\n"
    )


def _tooltip(point: TrialPoint, baseline: dict[str, float], on_front: bool) -> str:
    lines = [
        point.name + (" (Pareto front)" if on_front else ""),
        point.summary,
        f"validation {point.metric_name} {with_interval(point.metrics(), point.metric_name)} (selected the front)",
        f"test {point.metric_name} {with_interval(point.metrics(), 'test_' + point.metric_name)} (held out: quote this)",
        f"size {point.size_bytes / 1e3:.1f} KB ({baseline['size_bytes'] / point.size_bytes:.1f}x smaller)",
        f"latency {point.latency_ms:.4f} ms ({baseline['latency_ms'] / point.latency_ms:.2f}x faster)",
    ]
    return "\n".join(line for line in lines if line)


def _baseline_point(baseline: dict[str, float], metric: str = "accuracy") -> TrialPoint:
    return TrialPoint(
        run_id="", name="baseline", accuracy=baseline[metric], size_bytes=baseline["size_bytes"], latency_ms=baseline["latency_ms"], recipe="{}", summary="uncompressed",
        extra={key: value for key, value in baseline.items() if key not in {metric, "size_bytes", "latency_ms"}}, metric_name=metric,
    )



def _natural_key(name: str) -> list[str | int]:
    """``trial-9`` before ``trial-10``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
