"""What a running search prints: one line per finished, stopped, failed or retried trial."""

from __future__ import annotations

import time
from pathlib import Path

PACE_EVERY = 8  # trials between two lines of the search's pace
SLOW_TRIAL = 10.0  # seconds: trials this slow get a pace line each


def progress_printer(total: int, baseline: dict[str, float], done: int = 0, label: str = "", metric: str = "accuracy"):
    """Tune callback printing one line per finished, failed or retried trial (Tune pickles it: it holds no console).

    ``done``: trials a resumed search had finished before, so the count goes on from there.
    """
    from ray.tune import Callback

    class ProgressPrinter(Callback):
        def __init__(self) -> None:
            self.done = done
            self.started: float | None = None
            self.ended_here = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.started is None:
                self.started = time.time()

        def pace(self) -> None:
            """After every ``PACE_EVERY`` trials, or every trial once they take ``SLOW_TRIAL`` s or more: the mean wall
            time a trial takes here (concurrent trials overlap) and when the budget should end at that pace."""
            self.ended_here += 1
            if self.started is None:
                return
            seconds = (time.time() - self.started) / self.ended_here
            left = total - self.done
            if left <= 0 or (self.ended_here % PACE_EVERY and seconds < SLOW_TRIAL):
                return
            finish = time.strftime("%H:%M", time.localtime(time.time() + seconds * left))
            print(f"  {seconds:.1f} s a {label}trial on average; {left} left, done at about {finish}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            r = trial.last_result or {}
            if metric not in r:
                return
            stopped = ""
            if r.get("stopped_early"):
                share = r["stopped_at_fraction"]
                stopped = f"stopped after {share:.0%} of fine-tuning, " if share > 0 else "stopped before fine-tuning, "
            print(
                f"[{label}{self.done}/{total}] {stopped}{_score(metric, r[metric])}  size {r['size_bytes'] / 1e3:.1f} KB "
                f"({baseline['size_bytes'] / r['size_bytes']:.1f}x smaller)  latency {r['latency_ms']:.4f} ms "
                f"({baseline['latency_ms'] / r['latency_ms']:.2f}x)  {_describe(trial.config.get('recipe') or trial.config.get('point', {}).get('recipe'))}",
                flush=True,
            )
            self.pace()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[{label}{self.done}/{total}] trial failed: {_first_error_line(trial)}", flush=True)
            self.pace()

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"trial {trial.trial_id} failed ({_first_error_line(trial)}), running it again", flush=True)

    return ProgressPrinter()


def _score(metric: str, value: float) -> str:
    """``acc 97.50%`` (the built-in task's line as it always read), ``f1_macro 0.9123``."""
    return f"acc {value:.2%}" if metric == "accuracy" else f"{metric} {value:.4f}"


def _describe(recipe: str | None) -> str:
    from netshrink.techniques import Pipeline

    return Pipeline.from_recipe(recipe).describe() if recipe else ""


def _first_error_line(trial, limit: int = 200) -> str:
    """The exception's message, cut short: Ray's message for a dead worker runs to 800 characters."""
    try:
        text = Path(trial.error_file).read_text().strip().splitlines()
    except (OSError, TypeError):
        return "see the Ray trial folder"
    line = text[-1] if text else "see the Ray trial folder"
    return line if len(line) <= limit else line[: limit - 3] + "..."
