"""Reading a search back from MLflow (for ``netshrink front`` and later export)."""

from __future__ import annotations

from dataclasses import dataclass, field

from netshrink.errors import UserError

from .front import WIDTH_KEY, TrialPoint, closest_to_feasible, pareto_front, width_figures
from netshrink.deploy.evaluate import STOPPED

from .tracking import RECIPE_TAG, REFINED_FROM_TAG, SUMMARY_TAG, SearchRecord, Tracker, default_tracking_uri


@dataclass
class LoadedFront:
    search: SearchRecord
    front: list[TrialPoint]
    points: list[TrialPoint]
    closest: list[TrialPoint] = field(default_factory=list)  # no trial feasible: those nearest the constraints (``front.closest_to_feasible``)

    @property
    def parent_run_id(self) -> str:
        return self.search.run_id

    @property
    def baseline(self) -> dict[str, float]:
        return self.search.baseline


def collect_points(
    tracker: Tracker, experiment_id: str, parent_run_id: str | None = None, metric: str = "accuracy", include_stopped: bool = False
) -> tuple[list[TrialPoint], int]:
    """Finished trials of one search (or of all searches) as points, and the count of failed ones; ``metric``: the task's.
    ``include_stopped``: also the trials early stopping ended (KILLED, measured as they stood, ``stopped_early`` among
    their figures), which are never on a front but can be the closest a search came to its constraints."""
    points, failed = [], 0
    for run in tracker.trial_runs(experiment_id, parent_run_id):
        metrics = run.data.metrics
        stopped = include_stopped and run.info.status == "KILLED" and metrics.get(STOPPED) == 1.0
        if (run.info.status != "FINISHED" and not stopped) or not {metric, "size_bytes", "latency_ms"} <= metrics.keys():
            failed += run.info.status == "FAILED"
            continue
        # a slimmable trial: one point per width, each at the width's metric and latency and the one artifact's size
        widths = width_figures(metrics) or [(None, metrics)]
        for width, figures in widths:
            extra = {k: v for k, v in metrics.items() if k not in {metric, "size_bytes", "latency_ms"} and not k.startswith("width_")}
            if width is not None:
                extra.update({k: v for k, v in figures.items() if k not in {metric, "size_bytes", "latency_ms"}})
                extra[WIDTH_KEY] = width
            points.append(
                TrialPoint(
                    run_id=run.info.run_id,
                    name=run.info.run_name if width is None else f"{run.info.run_name}@{width:g}",
                    accuracy=figures[metric],
                    size_bytes=metrics["size_bytes"],
                    latency_ms=figures["latency_ms"],
                    recipe=run.data.tags.get(RECIPE_TAG, "{}"),
                    summary=run.data.tags.get(SUMMARY_TAG, ""),
                    extra=extra,
                    refined_from=run.data.tags.get(REFINED_FROM_TAG),
                    metric_name=metric,
                )
            )
    return points, failed


def finished_only(points: list[TrialPoint]) -> list[TrialPoint]:
    """``collect_points(..., include_stopped=True)``'s points less the trials early stopping ended: what ``collect_points``
    gives without them (a FINISHED run never carries ``stopped_early``)."""
    return [point for point in points if not point.extra.get(STOPPED)]


def load_front(experiment_name: str, tracking_uri: str | None = None, search_run: str | None = None) -> LoadedFront:
    tracker = Tracker(tracking_uri or default_tracking_uri())
    experiment_id = tracker.experiment_id(experiment_name, create=False)
    if experiment_id is None:
        raise UserError(f"--experiment: no MLflow experiment named {experiment_name!r} at {tracker.uri}")
    if search_run:
        try:
            record = tracker.search_record(search_run)
        except Exception:
            raise UserError(f"--search: no run {search_run!r} in {tracker.uri}") from None
    else:
        record = tracker.latest_search(experiment_id)
        if record is None:
            raise UserError(f"--experiment: {experiment_name!r} has no search runs yet")
    measured, _failed = collect_points(tracker, experiment_id, record.run_id, record.metric, include_stopped=True)
    if not measured:
        raise UserError(f"search {record.run_id} of {experiment_name!r} has no finished trials")
    points = finished_only(measured)
    front = pareto_front(points, record.objectives, record.directions, record.constraints)
    closest = closest_to_feasible(measured, record.constraints, record.objectives, record.directions) if not front and record.constraints else []
    return LoadedFront(search=record, front=front, points=points, closest=closest)
