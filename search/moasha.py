"""Multi-objective asynchronous successive halving (MO-ASHA) over fine-tuning epochs, as a Ray Tune scheduler.

A trial fine-tunes in rungs, for example after 1, 3 and 9 epochs (``search.multi_fidelity``). At each rung but
the last it is measured in full, as if its fine-tuning ended there (``netshrink.deploy.evaluate``), and reports;
this scheduler then ranks it among every trial recorded at that rung so far and decides:

- the top ``1 / reduction_factor`` goes on, from where it stands (the trial's process keeps its model and
  optimizer: nothing is retrained);
- the rest stop. A stopped trial is a measured model like any other: its MLflow run is finished with the
  rung's figures and artifact, it can be on the front, refinement can pick it, and Optuna learns from it
  (``searcher.annotate`` flags it as measured at a rung).

It is asynchronous, as ASHA (Li et al. 2020) is: a trial is judged against the trials recorded at its rung so far,
no rung waits for a cohort, and the first trial to reach a rung goes on.

The ranking follows MO-ASHA (Schmucker et al. 2021, arXiv 2106.12639; syne-tune's ``MOASHA``, Apache-2.0, read as
the reference design): non-dominated sorting on the objectives as measured at the rung, ties within a front broken by
crowding distance (NSGA-II's order, Deb et al. 2002). On top of it, constraints come first, as in NSGA-II's constrained
domination: a trial that meets the search's constraints outranks one that does not, and among those that do not, the
smaller violation ranks first. The metric floor is judged with the recovery still to come: the allowance the
search's own trials showed from that share of fine-tuning (``netshrink.deploy.stopping.Recovery``), so that a
trial a few points under the floor after one epoch is not cut for what two more would repair. Size and latency do not
change with fine-tuning: a trial over ``max_size_bytes`` at its first rung stays over it.

Each decision is logged on the trial's MLflow run (``rung``, ``rung_decision``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from netshrink.deploy.evaluate import RUNG_METRIC

from .constraints import Constraints

RUNG_TAG = "rung"  # "1 of 3 (1 epoch)": the rung a trial's figures were measured at
DECISION_TAG = "rung_decision"  # "promoted at rung 1: ..." or "stopped at rung 1: ...", the scheduler's last word on the trial
MF_STOPPED_TAG = "stopped_at_rung"  # "true" on a trial MO-ASHA stopped: its figures are its last rung's


def rank_order(values: Sequence[Sequence[float]], directions: Sequence[str], violations: Sequence[float]) -> list[int]:
    """Indices of ``values`` best first: feasible (violation 0) before infeasible, infeasible by violation, the feasible by
    non-dominated front, then by crowding distance (larger first). ``directions``: "max" or "min" per objective."""
    signs = [-1.0 if d == "max" else 1.0 for d in directions]
    costs = [[s * v for s, v in zip(signs, row)] for row in values]
    feasible = [i for i, v in enumerate(violations) if v <= 0]
    infeasible = sorted((i for i, v in enumerate(violations) if v > 0), key=lambda i: violations[i])
    order: list[int] = []
    remaining = list(feasible)
    while remaining:
        front = [i for i in remaining if not any(_dominates(costs[j], costs[i]) for j in remaining if j != i)]
        distance = _crowding(front, costs)
        order += sorted(front, key=lambda i: -distance[i])
        remaining = [i for i in remaining if i not in front]
    return order + infeasible


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def _crowding(front: list[int], costs: list[list[float]]) -> dict[int, float]:
    distance = {i: 0.0 for i in front}
    if len(front) <= 2:
        return {i: math.inf for i in front}
    for axis in range(len(costs[front[0]])):
        ordered = sorted(front, key=lambda i: costs[i][axis])
        low, high = costs[ordered[0]][axis], costs[ordered[-1]][axis]
        if high == low:
            continue  # an axis on which the front does not differ says nothing about crowding
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        for before, here, after in zip(ordered, ordered[1:], ordered[2:]):
            distance[here] += (costs[after][axis] - costs[before][axis]) / (high - low)
    return distance


class MultiObjectiveASHA(FIFOScheduler):
    """MO-ASHA on the results trials report at their rungs (``rung_epochs``); see the module's docstring.

    ``rungs``: the rung epochs, the last one the whole fine-tuning (a trial there ends by itself).
    ``allowance(share)``: the metric recovery still expected from that share of fine-tuning (the search's calibrated table).
    ``log(run_id, tags)``: where each decision goes (the trial's MLflow run).
    """

    def __init__(
        self,
        objectives: Sequence[str],
        directions: Sequence[str],
        rungs: Sequence[int],
        reduction_factor: float,
        metric: str,
        constraints: Constraints | None = None,
        allowance: Callable[[float], float] | None = None,
        log: Callable[[str, dict[str, str]], None] | None = None,
    ) -> None:
        super().__init__()
        self.objectives, self.directions = list(objectives), list(directions)
        self.rungs = list(rungs)
        self.reduction_factor = reduction_factor
        self.task_metric = metric
        self.constraints = constraints
        self.allowance = allowance or (lambda share: 0.0)
        self.log = log
        self.recorded: dict[int, dict[str, tuple[list[float], float]]] = {epochs: {} for epochs in self.rungs[:-1]}
        self.decisions: dict[str, tuple[int, str]] = {}  # trial -> (rung epochs, "promoted" | "stopped")

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives are ours; Tune's single metric and mode mean nothing to this scheduler

    def violation(self, result: dict, share: float) -> float:
        """How far the result is from meeting the constraints, with the metric floor lowered by the recovery still expected."""
        if self.constraints is None:
            return 0.0
        values = dict(result)
        for key in (self.task_metric, f"onnx_{self.task_metric}"):
            if key in values:
                values[key] = values[key] + self.allowance(share)
        return sum(max(0.0, v) for v in self.constraints.violations(values).values())

    def decide(self, trial_id: str, result: dict) -> str:
        if result.get("final") or result.get("stopped_early"):
            return TrialScheduler.CONTINUE  # a trial's last report (it ended by itself, or early stopping ended it): no rung
        measured = float(result[RUNG_METRIC])
        epochs = int(measured)
        if epochs != measured or epochs not in self.recorded:
            return TrialScheduler.CONTINUE  # the last rung, or no rung at all: the trial ends by itself
        share = epochs / self.rungs[-1]
        at_rung = self.recorded[epochs]
        at_rung[trial_id] = ([float(result[name]) for name in self.objectives], self.violation(result, share))
        ids = list(at_rung)
        order = rank_order([at_rung[i][0] for i in ids], self.directions, [at_rung[i][1] for i in ids])
        position = order.index(ids.index(trial_id))
        keep = position / len(ids) <= 1 / self.reduction_factor
        index = self.rungs.index(epochs) + 1
        verdict = "promoted" if keep else "stopped"
        why = f"ranked {position + 1} of {len(ids)} measured at this rung so far; the top 1/{self.reduction_factor:g} go on"
        if at_rung[trial_id][1] > 0:
            why += " (misses a constraint even with the recovery still expected)"
        self.decisions[trial_id] = (epochs, verdict)
        run_id = result.get("mlflow_run_id")
        if self.log is not None and run_id:
            tags = {RUNG_TAG: f"{index} of {len(self.rungs)} ({epochs} epoch{'s' if epochs != 1 else ''})", DECISION_TAG: f"{verdict} at rung {index}: {why}"}
            if not keep:
                tags[MF_STOPPED_TAG] = "true"
            self.log(run_id, tags)
        return TrialScheduler.CONTINUE if keep else TrialScheduler.STOP

    def restore(self, tracker, experiment_id: str, parent_run_id: str) -> int:
        """A resumed search: each earlier trial's figures at each rung, read back from its run's metric histories (step =
        the rung's epochs), so the new trials are ranked against them. Returns how many rung records came back."""
        restored = 0
        for run in tracker.trial_runs(experiment_id, parent_run_id):
            if run.info.status not in ("FINISHED", "KILLED") or "refined_from" in run.data.tags:
                continue
            histories = {name: {int(m.step): m.value for m in tracker.client.get_metric_history(run.info.run_id, name)} for name in self.objectives}
            extra = {f"onnx_{self.task_metric}": {int(m.step): m.value for m in tracker.client.get_metric_history(run.info.run_id, f"onnx_{self.task_metric}")}}
            for epochs in self.recorded:
                if all(epochs in history for history in histories.values()):
                    result = {name: histories[name][epochs] for name in self.objectives}
                    if epochs in extra[f"onnx_{self.task_metric}"]:
                        result[f"onnx_{self.task_metric}"] = extra[f"onnx_{self.task_metric}"][epochs]
                    self.recorded[epochs][run.info.run_id] = (
                        [float(result[name]) for name in self.objectives], self.violation(result, epochs / self.rungs[-1])
                    )
                    restored += 1
        return restored

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if RUNG_METRIC not in result or not all(name in result for name in self.objectives):
            return TrialScheduler.CONTINUE
        return self.decide(trial.trial_id, result)

    def debug_string(self) -> str:
        counts = ", ".join(f"{epochs} epochs: {len(seen)}" for epochs, seen in self.recorded.items())
        return f"MultiObjectiveASHA: trials recorded per rung: {counts}"
