"""Reading a search back from MLflow (for ``netshrink front`` and later export)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from netshrink.config import OBJECTIVES
from netshrink.errors import UserError

from .constraints import Constraints
from .front import TrialPoint, pareto_front
from .tracking import RECIPE_TAG, REFINED_FROM_TAG, SUMMARY_TAG, Tracker, default_tracking_uri


@dataclass
class LoadedFront:
    parent_run_id: str
    front: list[TrialPoint]
    points: list[TrialPoint]
    baseline: dict[str, float]


def collect_points(tracker: Tracker, experiment_id: str, parent_run_id: str | None = None) -> tuple[list[TrialPoint], int]:
    """Finished trials of one search (or of all searches) as points, and the count of failed ones."""
    points, failed = [], 0
    for run in tracker.trial_runs(experiment_id, parent_run_id):
        metrics = run.data.metrics
        if run.info.status != "FINISHED" or not {"accuracy", "size_bytes", "latency_ms"} <= metrics.keys():
            failed += run.info.status == "FAILED"
            continue
        points.append(
            TrialPoint(
                run_id=run.info.run_id,
                name=run.info.run_name,
                accuracy=metrics["accuracy"],
                size_bytes=metrics["size_bytes"],
                latency_ms=metrics["latency_ms"],
                recipe=run.data.tags.get(RECIPE_TAG, "{}"),
                summary=run.data.tags.get(SUMMARY_TAG, ""),
                extra={k: v for k, v in metrics.items() if k not in {"accuracy", "size_bytes", "latency_ms"}},
                refined_from=run.data.tags.get(REFINED_FROM_TAG),
            )
        )
    return points, failed


def load_front(experiment_name: str, tracking_uri: str | None = None, search_run: str | None = None) -> LoadedFront:
    tracker = Tracker(tracking_uri or default_tracking_uri())
    experiment_id = tracker.experiment_id(experiment_name, create=False)
    if experiment_id is None:
        raise UserError(f"--experiment: no MLflow experiment named {experiment_name!r} at {tracker.uri}")
    if search_run:
        try:
            parent = tracker.client.get_run(search_run)
        except Exception:
            raise UserError(f"--search: no run {search_run!r} in {tracker.uri}") from None
    else:
        parent = tracker.latest_search(experiment_id)
        if parent is None:
            raise UserError(f"--experiment: {experiment_name!r} has no search runs yet")
    objectives = json.loads(parent.data.tags.get("objectives", json.dumps(list(OBJECTIVES))))
    points, _failed = collect_points(tracker, experiment_id, parent.info.run_id)
    if not points:
        raise UserError(f"search {parent.info.run_id} of {experiment_name!r} has no finished trials")
    front = pareto_front(points, objectives, [OBJECTIVES[o] for o in objectives], Constraints.from_tags(parent.data.tags))
    baseline = {key.removeprefix("baseline_"): value for key, value in parent.data.metrics.items() if key.startswith("baseline_")}
    return LoadedFront(parent_run_id=parent.info.run_id, front=front, points=points, baseline=baseline)
