"""What a running search prints: one line per finished, stopped, failed or retried trial."""

from __future__ import annotations

import time
from pathlib import Path

from netshrink.errors import DISK_FULL_TEXT, SearchStopped

from .tracking import DEFAULT_TIMEOUT_S, ping

PACE_EVERY = 8  # trials between two lines of the search's pace
SLOW_TRIAL = 10.0  # seconds: trials this slow get a pace line each


WATCH_EVERY = 10.0  # seconds between two checks that the tracking server answers


def fatal(trial) -> SearchStopped | None:
    """The error that stops the whole search, if the trial failed with one: a full disk (every next trial would fail
    the same way) or a tracking server gone for ``tracking.timeout_s``. Such a trial is not run again."""
    text = _error_text(trial)
    if "TrackingUnavailable" in text:
        return SearchStopped(_message_of(text, "TrackingUnavailable"), cause="tracking")
    full = "DiskFull" in text or any(phrase in text.lower() for phrase in DISK_FULL_TEXT)
    if full:
        return SearchStopped(_message_of(text, "DiskFull") if "DiskFull" in text else f"the disk is full ({_first_error_line(trial)})", cause="disk")
    return None


def _message_of(text: str, kind: str) -> str:
    line = next((line for line in reversed(text.splitlines()) if f"{kind}:" in line), kind)
    return line.split(f"{kind}:", 1)[1].strip() or kind


class ServerWatch:
    """Checks every ``WATCH_EVERY`` s, from the driver, that the tracking server answers (``/health``); while it does
    not, says so once per check ("tracking server ... unreachable, retrying (attempt 2/19)"), and after ``timeout_s``
    raises ``SearchStopped``: the trials' own calls wait as long, so the search neither hangs nor goes on blind."""

    def __init__(self, uri: str, timeout_s: float) -> None:
        self.uri, self.timeout_s = uri, timeout_s
        self.last = 0.0
        self.down_since: float | None = None
        self.attempt = 0

    def check(self) -> None:
        now = time.monotonic()
        if now - self.last < WATCH_EVERY:
            return
        self.last = now
        try:
            ping(self.uri, timeout_s=5)
        except OSError:
            self.attempt += 1
            self.down_since = self.down_since or now
            attempts = int(self.timeout_s // WATCH_EVERY) + 1
            if now - self.down_since >= self.timeout_s:
                raise SearchStopped(
                    f"the MLflow tracking server {self.uri} did not answer for {self.timeout_s:g} s (tracking.timeout_s)", cause="tracking"
                ) from None
            print(f"tracking server {self.uri} unreachable, retrying (attempt {self.attempt + 1}/{attempts})", flush=True)
            return
        if self.down_since is not None:
            print(f"tracking server {self.uri} answers again", flush=True)
        self.down_since, self.attempt = None, 0


RUNNING_EVERY = 60.0  # seconds between two looks at where the running trials stand


class RunningTrials:
    """Every ``RUNNING_EVERY`` s, from the driver: the ``progress`` line each running trial last wrote to its MLflow run
    (its fine-tuning's epoch and step, with the time to go), printed when it changed. Long trials (a ResNet-18 on a CPU
    fine-tunes for minutes) so show that they move; the workers' own output does not reach the console."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str) -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.last = time.monotonic()
        self.shown: dict[str, str] = {}

    def check(self) -> None:
        now = time.monotonic()
        if now - self.last < RUNNING_EVERY:
            return
        self.last = now
        from mlflow.tracking import MlflowClient

        from .tracking import PARENT_TAG, PROGRESS_TAG

        try:
            runs = MlflowClient(self.uri).search_runs(
                [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and attributes.status = 'RUNNING'"
            )
        except Exception:  # the server's health is ServerWatch's business; a missed look is no loss
            return
        for run in runs:
            line = run.data.tags.get(PROGRESS_TAG)
            if line and self.shown.get(run.info.run_id) != line:
                self.shown[run.info.run_id] = line
                print(f"  {run.info.run_name}: {line}", flush=True)


OPEN_ENDED = 100_000  # the trial count of a search that only a time budget limits (search.budget without trials)


def progress_printer(
    total: int, baseline: dict[str, float], done: int = 0, label: str = "", metric: str = "accuracy",
    tracking_uri: str = "", timeout_s: float = DEFAULT_TIMEOUT_S, experiment_id: str = "", parent_run_id: str = "",
    deadline: float | None = None,
):
    """Tune callback printing one line per finished, failed or retried trial (Tune pickles it: it holds no console).

    ``done``: trials a resumed search had finished before, so the count goes on from there. It also stops the
    search (raises ``SearchStopped`` out of ``Tuner.fit``) on a trial error that every next trial would meet too
    (``fatal``), and, with a tracking server, when the server stays away (``ServerWatch``). ``deadline`` (a time
    budget's end, ``time.time()``): the pace line says the time left, and a search only time limits counts trials with no total.
    """
    open_ended = deadline is not None and total >= OPEN_ENDED
    from ray.tune import Callback

    class ProgressPrinter(Callback):
        def __init__(self) -> None:
            self.done = done
            self.started: float | None = None
            self.ended_here = 0
            self.watch = ServerWatch(tracking_uri, timeout_s) if tracking_uri.startswith(("http://", "https://")) else None
            self.running = RunningTrials(tracking_uri, experiment_id, parent_run_id) if tracking_uri and parent_run_id else None

            self.stop: SearchStopped | None = None  # a fatal trial error, raised at the end of Tune's step

        def on_step_end(self, iteration, trials, **info):
            # raised here, not in on_trial_error: Tune wraps what a trial-error callback raises in a TuneError of its own
            if self.stop is not None:
                raise self.stop
            if self.watch is not None:
                self.watch.check()
            if self.running is not None:
                self.running.check()

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.started is None:
                self.started = time.time()

        def count(self) -> str:
            return str(self.done) if open_ended else f"{self.done}/{total}"

        def pace(self) -> None:
            """After every ``PACE_EVERY`` trials, or every trial once they take ``SLOW_TRIAL`` s or more: the mean wall
            time a trial takes here (concurrent trials overlap) and when the budget should end at that pace."""
            self.ended_here += 1
            if self.started is None:
                return
            seconds = (time.time() - self.started) / self.ended_here
            if deadline is not None:
                if self.ended_here % PACE_EVERY == 0 or seconds >= SLOW_TRIAL:
                    print(f"  {seconds:.1f} s a {label}trial on average; {max(0.0, deadline - time.time()) / 60:.1f} min of the time budget left", flush=True)
                return
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
            elif "rung_epochs" in r and not r.get("final") and r.get("rung_of", 1) > 1:
                epochs = r["rung_epochs"]
                stopped = f"stopped at its rung of {epochs:g} epoch{'s' if epochs != 1 else ''} (MO-ASHA), "
            if "operating_width" in r:  # a slimmable trial: the width it is judged by (trial.as_judged); MLflow has every width
                stopped += f"at width {r['operating_width']:g} of {r.get('widths', 0):.0f}, "
            print(
                f"[{label}{self.count()}] {stopped}{_score(metric, r[metric])}  size {r['size_bytes'] / 1e3:.1f} KB "
                f"({baseline['size_bytes'] / r['size_bytes']:.1f}x smaller)  latency {r['latency_ms']:.4f} ms "
                f"({baseline['latency_ms'] / r['latency_ms']:.2f}x)  {_describe(trial.config.get('recipe') or trial.config.get('point', {}).get('recipe'))}",
                flush=True,
            )
            self.pace()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.stop = self.stop or fatal(trial)
            if self.stop is not None:
                return
            self.done += 1
            print(f"[{label}{self.count()}] trial failed: {_first_error_line(trial)}", flush=True)
            self.pace()

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.stop = self.stop or fatal(trial)
            if self.stop is not None:
                return  # the search stops before the retry runs: it would fail the same way
            print(f"trial {trial.trial_id} failed ({_first_error_line(trial)}), running it again", flush=True)

    return ProgressPrinter()


def _score(metric: str, value: float) -> str:
    """``acc 97.50%`` (the built-in task's line as it always read), ``f1_macro 0.9123``."""
    return f"acc {value:.2%}" if metric == "accuracy" else f"{metric} {value:.4f}"


def _describe(recipe: str | None) -> str:
    from netshrink.techniques import Pipeline

    return Pipeline.from_recipe(recipe).describe() if recipe else ""


def _error_text(trial) -> str:
    try:
        return Path(trial.error_file).read_text()
    except (OSError, TypeError):
        return ""


def _first_error_line(trial, limit: int = 200) -> str:
    """The exception's message, cut short: Ray's message for a dead worker runs to 800 characters. SQLAlchemy's
    closing "(Background on this error at: ...)" line says nothing; the line before it does."""
    lines = [line for line in _error_text(trial).strip().splitlines() if line.strip() and not line.startswith("(Background on this error")]
    line = lines[-1] if lines else "see the Ray trial folder"
    return line if len(line) <= limit else line[: limit - 3] + "..."
