"""After the trials: the Pareto front over every finished run, tagged in MLflow, drawn, and printed."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from .constraints import Constraints
from .front import TrialPoint, front_json, pareto_front, print_front
from .plots import log_plots
from .report import collect_points
from .tracking import PARETO_TAG, SearchRecord, Tracker, is_local


@dataclass(frozen=True)
class Summary:
    front: list[TrialPoint]
    points: list[TrialPoint]
    failed: int
    repeats: int
    baseline: dict[str, float]


def summarise(tracker: Tracker, experiment_id: str, record: SearchRecord, constraints: Constraints, repeats: int) -> Summary:
    """Take the front over the search's finished runs (trials and refined runs), tag every run ``pareto``, log the
    counts, ``front.json`` and the plots to the parent run, and mark it finished."""
    parent = record.run_id
    points, failed = collect_points(tracker, experiment_id, parent, record.metric)
    front = pareto_front(points, record.objectives, record.directions, constraints)
    on_front = {p.run_id for p in front}
    for point in points:
        tracker.client.set_tag(point.run_id, PARETO_TAG, "true" if point.run_id in on_front else "false")
    tracker.log_search_outcome(
        record, finished=len(points), failed=failed, front_size=len(front), repeats=repeats, front_json=front_json(front, record.baseline)
    )
    log_plots(tracker, parent, points, front, record.baseline, record.objectives, constraints.min_accuracy)
    tracker.finish(parent)
    return Summary(front=front, points=points, failed=failed, repeats=repeats, baseline=record.baseline)


def print_summary(summary: Summary, name: str, seconds: float, tracking_uri: str, console: Console) -> None:
    if summary.repeats:
        console.print(f"The sampler proposed {summary.repeats} pipeline(s) already evaluated; their earlier results were reused, not retrained.")
    title = f"Pareto front of {name!r}: {len(summary.front)} of {len(summary.points)} finished trials ({summary.failed} failed), {seconds:.0f} s"
    print_front(summary.front, summary.baseline, title=title, console=console)
    cost = trial_cost(summary.points)
    if cost:
        console.print(cost)
    if is_local(tracking_uri):
        console.print(f"Browse it: mlflow ui --backend-store-uri {tracking_uri}")


def trial_cost(points: list[TrialPoint]) -> str | None:
    """What a trial cost, in one line: wall time and peak resident memory per finished trial (median and most)."""
    import statistics

    seconds = [p.extra["seconds_trial"] for p in points if "seconds_trial" in p.extra]
    memory = [p.extra["peak_rss_bytes"] for p in points if p.extra.get("peak_rss_bytes")]
    parts = []
    if seconds:
        parts.append(f"wall time {statistics.median(seconds):.1f} s median, {max(seconds):.1f} s most")
    if memory:
        parts.append(f"peak memory {statistics.median(memory) / 2**20:.0f} MiB median, {max(memory) / 2**20:.0f} MiB most")
    return f"Per trial: {'; '.join(parts)}" if parts else None
