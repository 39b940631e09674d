"""After the trials: the Pareto front over every finished run, tagged in MLflow, drawn, and printed."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console

from netshrink.deploy.evaluate import STOPPED

from .constraints import Constraints
from .front import TrialPoint, closest_to_feasible, front_json, pareto_front, print_front
from .plots import log_plots
from .report import collect_points, finished_only
from .moasha import MF_STOPPED_TAG, RUNG_TAG
from .tracking import PARETO_TAG, REFINED_FROM_TAG, STOPPED_TAG, SearchRecord, Tracker, is_local


@dataclass(frozen=True)
class Summary:
    front: list[TrialPoint]
    points: list[TrialPoint]
    failed: int
    repeats: int
    baseline: dict[str, float]
    spending: str | None = None  # how the time went: trials by rung, stopped trials, refinement
    closest: list[TrialPoint] = field(default_factory=list)  # no trial feasible: those nearest the constraints
    constraints: Constraints | None = None
    advice: str | None = None  # no trial feasible: what to change


def summarise(
    tracker: Tracker, experiment_id: str, record: SearchRecord, constraints: Constraints, repeats: int, spent: dict[str, float] | None = None,
    config=None,
) -> Summary:
    """Take the front over the search's finished runs (trials and refined runs), tag every run ``pareto``, log the
    counts, ``front.json`` and the plots to the parent run, and mark it finished."""
    parent = record.run_id
    measured, failed = collect_points(tracker, experiment_id, parent, record.metric, include_stopped=True)
    points = finished_only(measured)
    front = pareto_front(points, record.objectives, record.directions, constraints)
    on_front = {p.run_id for p in front}
    for point in points:
        tracker.client.set_tag(point.run_id, PARETO_TAG, "true" if point.run_id in on_front else "false")
    tracker.log_search_outcome(
        record, finished=len(points), failed=failed, front_size=len(front), repeats=repeats, front_json=front_json(front, record.baseline)
    )
    log_plots(tracker, parent, points, front, record.baseline, record.objectives, constraints.min_accuracy)
    spending = time_spent(tracker.trial_runs(experiment_id, parent), spent) if spent is not None else None
    if spending:
        tracker.log(parent, tags={SPENDING_TAG: spending[:5000]})
    # the trials early stopping ended count too: measured as they stood, they may be the nearest
    closest = closest_to_feasible(measured, constraints, record.objectives, record.directions) if not front else []
    advice = what_to_change(closest, constraints, config) if not front and config is not None else None
    if advice:
        tracker.log(parent, tags={ADVICE_TAG: advice[:5000]})
    tracker.finish(parent)
    return Summary(
        front=front, points=points, failed=failed, repeats=repeats, baseline=record.baseline, spending=spending, closest=closest,
        constraints=constraints, advice=advice,
    )


ADVICE_TAG = "what_to_change"  # a search with no feasible trial: what to change, in words


def what_to_change(closest: list[TrialPoint], constraints: Constraints, experiment) -> str:
    """What to change when no trial met the constraints, from what the closest trials miss."""
    metric = constraints.metric
    short_of_floor = [p for p in closest if constraints.violations(p.metrics())[constraints.floor_name] > 0]
    lines = ["No trial met the constraints. What to change:"]
    if not closest:
        lines.append("- no trial was measured: look at the failed trials' errors (the progress lines, or each run's error tag in MLflow)")
        return "\n".join(lines)
    if all(p.extra.get(STOPPED) for p in closest):
        lines.append(
            "- every trial was stopped early, its metric too far under the floor for the recovery this search had seen: "
            "search.early_stopping: false lets each one fine-tune to the end"
        )
    if short_of_floor:
        nearest = min(constraints.violations(p.metrics())[constraints.floor_name] for p in short_of_floor)
        lines.append(
            f"- more fine-tuning: finetune.epochs is {experiment.finetune.epochs}; the closest trial is {100 * nearest:.1f} points under "
            f"min_{metric}" + (", and refine.epochs (now 0) fine-tunes the most promising points longer after the search" if experiment.refine.epochs == 0 else "")
        )
        drop = experiment.max_metric_drop
        lines.append(
            f"- a looser floor: max_metric_drop is {'the default 0.05' if drop is None and experiment.min_metric is None else drop}"
            + (f", min_metric {experiment.min_metric}" if experiment.min_metric is not None else "")
        )
    if any(name != constraints.floor_name and value > 0 for p in closest for name, value in constraints.violations(p.metrics()).items()):
        lines.append("- a looser max_size_bytes or max_latency_ms, or stronger compression in the space (higher pruning ratios, fewer bits)")
    lines.append(
        "- a narrower space: leave out the techniques of the trials that ended furthest from the floor (space: <technique>: {enabled: false}), "
        "so the budget goes to the rest"
    )
    lines.append("- or export the closest anyway: netshrink export --pick RUN_ID (it is marked infeasible)")
    return "\n".join(lines)


SPENDING_TAG = "time_spent"  # the parent run's account of where the search's time went


def time_spent(runs: list, spent: dict[str, float]) -> str:
    """Where the time went, in a few lines: the phases' wall time, the trials by the rung they ended at (with the
    worker seconds they took), those stopped early by the metric floor, and the refined runs."""
    from collections import defaultdict

    trials = [run for run in runs if REFINED_FROM_TAG not in run.data.tags]
    refined = [run for run in runs if REFINED_FROM_TAG in run.data.tags]
    by_rung: dict[str, list[float]] = defaultdict(list)
    for run in trials:
        metrics, tags = run.data.metrics, run.data.tags
        seconds = metrics.get("seconds_trial", 0.0)
        if run.info.status == "FAILED":
            by_rung["failed"].append(seconds)
        elif tags.get(STOPPED_TAG) == "true":
            by_rung["stopped early by the metric floor"].append(seconds)
        elif tags.get(MF_STOPPED_TAG) == "true":
            by_rung[f"stopped at rung {tags.get(RUNG_TAG, '?')}"].append(seconds)
        elif "rung_of" in metrics and metrics["rung_of"] > 1:
            by_rung["ran every rung"].append(seconds)
        else:
            by_rung["ran their whole fine-tuning"].append(seconds)
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in spent.items() if seconds >= 0.5)
    lines = [f"Time: {sum(spent.values()):.0f} s in all ({phases})."]
    if by_rung:
        lines.append(
            f"Trials: {len(trials)}; " + "; ".join(f"{len(seconds)} {name} ({sum(seconds):.0f} s of trial time)" for name, seconds in sorted(by_rung.items()))
        )
    if refined:
        lines.append(f"Refinement: {len(refined)} point(s), {sum(run.data.metrics.get('seconds_trial', 0.0) for run in refined):.0f} s of trial time.")
    return "\n".join(lines)


def print_summary(summary: Summary, name: str, seconds: float, tracking_uri: str, console: Console) -> None:
    if summary.repeats:
        console.print(f"The sampler proposed {summary.repeats} pipeline(s) already evaluated; their earlier results were reused, not retrained.")
    runs = len({point.run_id for point in summary.points})
    widths = f" ({len(summary.points)} points: slimmable trials count a point per width)" if runs < len(summary.points) else ""
    title = f"Pareto front of {name!r}: {len(summary.front)} of {runs} finished trials{widths} ({summary.failed} failed), {seconds:.0f} s"
    print_front(summary.front, summary.baseline, title=title, console=console, closest=summary.closest, constraints=summary.constraints)
    if summary.advice:
        console.print(summary.advice, highlight=False)
    cost = trial_cost(summary.points)
    if cost:
        console.print(cost)
    if summary.spending:
        console.print(summary.spending, highlight=False)
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
