"""Reading a search back from MLflow (for ``netshrink front`` and later export)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from netshrink.config import OBJECTIVES
from netshrink.errors import UserError

from .front import TrialPoint, pareto_front
from .runner import collect_points
from .tracking import Tracker, default_tracking_uri


@dataclass
class LoadedFront:
    parent_run_id: str
    front: list[TrialPoint]
    points: list[TrialPoint]
    baseline: dict[str, float]


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
    min_accuracy = parent.data.tags.get("min_accuracy")
    points, _failed = collect_points(tracker, experiment_id, parent.info.run_id)
    if not points:
        raise UserError(f"search {parent.info.run_id} of {experiment_name!r} has no finished trials")
    front = pareto_front(points, objectives, [OBJECTIVES[o] for o in objectives], float(min_accuracy) if min_accuracy else None)
    baseline = {key.removeprefix("baseline_"): value for key, value in parent.data.metrics.items() if key.startswith("baseline_")}
    return LoadedFront(parent_run_id=parent.info.run_id, front=front, points=points, baseline=baseline)
