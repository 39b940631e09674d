"""MLflow layout: one experiment per experiment name, a parent run per search, a child run per trial.

Children are created from Ray workers with ``mlflow.parentRunId`` set, so the
MLflow UI nests them under their search.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from netshrink.deploy.evaluate import RECIPE_FILE  # noqa: F401  (the run's artifact: the recipe as applied)

from netshrink.errors import TrackingUnavailable

from .constraints import Constraints

ROLE_TAG = "netshrink.role"
PARENT_TAG = "mlflow.parentRunId"
PROGRESS_TAG = "progress"  # a running trial's last line of where its fine-tuning stands
PARETO_TAG = "pareto"
NOTES_TAG = "notes"  # layers a technique left out, and why (``Compressed.notes``)
RECIPE_TAG = "recipe"  # the pipeline JSON, also kept as a tag so the front needs no artifact downloads
SUMMARY_TAG = "recipe_summary"  # the pipeline in one line
OPTUNA_TRIAL_TAG = "optuna_trial"  # the number of the child's trial in the Optuna study
TUNE_TRIAL_TAG = "ray_trial_id"  # the Tune trial a child belongs to: a retried trial finds its run again
ERROR_TAG = "error"
CONFIG_ARTIFACT = "experiment.yaml"  # the experiment file as the search read it, logged to the parent run
CONFIG_HASH_TAG = "config_sha256"  # SHA-256 of that file: a local copy is checked against it before its code runs
NODE_TAG = "ray_node_id"  # the Ray node the trial (its last attempt) ran on
DEVICE_TAG = "device"  # where fine-tuning ran: cpu, cuda:0, ...
FEASIBLE_TAG = "feasible"  # "true" or "false": whether the trial meets the search's constraints (search/constraints.py)
STOPPED_TAG = "stopped_early"  # "true" on a trial that early stopping ended (its run is KILLED)
STOPPED_AT_TAG = "stopped_at_fraction"  # the share of its fine-tuning such a trial had done
STOP_REASON_TAG = "stop_reason"  # why it was stopped, in words
ARTIFACT_SHA_TAG = "artifact_sha256"  # SHA-256 of the trial's compressed.safetensors as it wrote it: export checks the download
ONNX_SHA_TAG = "onnx_sha256"  # SHA-256 of the model.onnx the trial measured (export writes its own, and checks its metric)
REFINED_FROM_TAG = "refined_from"  # a refined run: the run id of the trial whose recipe it fine-tuned longer
ABANDONED_TAG = "netshrink.abandoned"  # "true" on a search marked ended with --abandon: --resume passes it by


def default_tracking_uri(workdir: Path | None = None) -> str:
    """A SQLite store in the working directory (MLflow's file store is deprecated)."""
    return f"sqlite:///{(workdir or Path.cwd()).resolve() / 'mlflow.db'}"


def is_local(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def flatten(nested: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}{sep}", sep))
        else:
            flat[name] = value
    return flat


BASELINE_PREFIX = "baseline_"  # the parent run's metrics: the baseline's figures, as baseline_accuracy, ...


@dataclass(frozen=True)
class SearchRecord:
    """What a search is, as its MLflow parent run holds it: the contract between ``search``, ``--resume``,
    ``front``, ``export`` and the plots. ``Tracker.start_search`` writes it and ``Tracker.search_record``
    reads it; no other module names a parent-run tag or metric."""

    run_id: str
    objectives: list[str]
    constraints: Constraints | None  # None for a search of a netshrink that recorded none
    baseline: dict[str, float]  # the baseline's figures the trials were compared with
    study_name: str | None
    storage_url: str | None
    config_file: str | None  # the experiment file's absolute path: export imports module:factory code from its folder
    config_sha256: str | None  # of the experiment file as the search read it (logged as the artifact experiment.yaml)
    trials: int | None  # the trial budget
    status: str = "RUNNING"
    metric: str = "accuracy"  # the task's metric, by its name: the key of its figures in every run
    abandoned: bool = False  # marked ended with ``netshrink search --abandon``: ``--resume`` passes it by

    @property
    def directions(self) -> list[str]:
        from netshrink.config import OBJECTIVES

        return ["max" if name == self.metric else OBJECTIVES[name] for name in self.objectives]


_STORAGE, _STUDY, _OBJECTIVES, _CONFIG_FILE = "optuna.storage", "optuna.study_name", "objectives", "config_file"


DEFAULT_TIMEOUT_S = 180.0  # tracking.timeout_s
REQUEST_TIMEOUT_S = "30"  # one HTTP request to the server; MLflow's default is 120 s, with 7 retries of its own on top


def retry_delays(timeout_s: float) -> list[float]:
    """Seconds to wait before each retry of a call to an unreachable server: doubling from 2 s to at most 30 s, until
    they add up to ``timeout_s``."""
    delays: list[float] = []
    while sum(delays) < timeout_s:
        delays.append(min(2.0 * 2 ** len(delays), 30.0, timeout_s - sum(delays)))
    return delays


def ping(uri: str, timeout_s: float) -> None:
    """Ask a tracking server's ``/health``; ``OSError`` (refused, timed out, an error status) if it does not answer."""
    import urllib.request

    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
        response.read()


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the server could not be reached (refused, timed out, dropped, answering 5xx), as MLflow's
    REST client reports it; not an error the server returned on purpose (a missing run, a bad request)."""
    import requests

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    text = str(error)
    return "API request to" in text and any(
        phrase in text for phrase in ("Max retries exceeded", "Connection refused", "timed out", "timeout", "Connection aborted", "Failed to establish")
    )


class RetryingClient:
    """``MlflowClient`` whose calls to a tracking server that does not answer are retried for ``timeout_s`` at most
    (``retry_delays``), each retry announced through ``log``; then ``TrackingUnavailable``. MLflow's own retries
    (about 8 minutes per call, silent) are turned off for the process unless the user set them."""

    def __init__(self, client: MlflowClient, uri: str, timeout_s: float, log) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT_S)
        self._client, self._uri, self._timeout_s, self._log = client, uri, timeout_s, log

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            delays = retry_delays(self._timeout_s)
            for attempt in range(len(delays) + 1):
                try:
                    return attribute(*args, **kwargs)
                except Exception as error:
                    if not unreachable(error):
                        raise
                    if attempt == len(delays):
                        raise TrackingUnavailable(
                            f"the MLflow tracking server {self._uri} did not answer for {self._timeout_s:g} s (tracking.timeout_s)"
                        ) from None
                    self._log(f"tracking server {self._uri} unreachable, retrying in {delays[attempt]:.0f} s (attempt {attempt + 2}/{len(delays) + 1})")
                    time.sleep(delays[attempt])

        return call


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Tracker:
    """Thin, explicit wrapper over ``MlflowClient`` (no fluent global state; safe in Ray workers).

    With a tracking server (``http(s)://``), a call the server does not answer is retried for ``timeout_s``
    (``tracking.timeout_s``), each retry said through ``log``, then ``TrackingUnavailable`` (``RetryingClient``).
    """

    def __init__(self, uri: str, timeout_s: float = DEFAULT_TIMEOUT_S, log=_stderr) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        if uri.startswith(("http://", "https://")):
            self.client = RetryingClient(self.client, uri, timeout_s, log)

    def experiment_id(self, name: str, create: bool = True) -> str | None:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        if not create:
            return None
        location = None
        if is_local(self.uri):
            # Without an explicit location MLflow resolves artifacts relative to each process's
            # working directory; Ray workers run in trial folders, so pin it down.
            store = Path(self.uri.removeprefix("sqlite:///")).parent if self.uri.startswith("sqlite:") else Path.cwd()
            location = (store / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def start_search(
        self,
        experiment_id: str,
        experiment_name: str,
        run_name: str,
        *,
        objectives: list[str],
        constraints: Constraints,
        baseline: dict[str, float],
        storage_url: str,
        config_path: Path,
        trials: int,
        params: dict[str, Any],
    ) -> SearchRecord:
        """The search's parent run, holding everything ``--resume``, ``front`` and ``export`` read back (``search_record``)."""
        text = config_path.read_text()
        run_id = self.client.create_run(
            experiment_id,
            run_name=run_name,
            tags={
                ROLE_TAG: "search",
                _STORAGE: storage_url,
                _CONFIG_FILE: str(config_path.resolve()),
                _OBJECTIVES: json.dumps(objectives),
                CONFIG_HASH_TAG: text_sha256(text),
                **constraints.to_tags(),  # as in force, min_accuracy's default resolved
            },
        ).info.run_id
        study_name = f"{experiment_name}/{run_id}"
        self.log(
            run_id,
            params={**params, "trials": trials},
            metrics={f"{BASELINE_PREFIX}{key}": value for key, value in baseline.items()},
            tags={_STUDY: study_name},
        )
        self.client.log_text(run_id, text, CONFIG_ARTIFACT)
        return self.search_record(run_id)

    def log_search_outcome(self, record: SearchRecord, *, finished: int, failed: int, front_size: int, repeats: int, front_json: str) -> None:
        """What the search's parent run holds once its trials are done: the counts and the front as JSON."""
        self.log(record.run_id, metrics={"trials_finished": finished, "trials_failed": failed, "front_size": front_size, "repeats_skipped": repeats})
        self.client.log_text(record.run_id, front_json, "front.json")

    def log_history(self, run_id: str, metric: str, values: list[float]) -> None:
        """``values`` as the history of ``metric``, one step per value from 1 (MLflow shows the last as the metric's value)."""
        now = int(time.time() * 1000)
        steps = [Metric(metric, value, now, step) for step, value in enumerate(values, start=1)]
        for start in range(0, len(steps), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=steps[start : start + 1000])

    def search_record(self, run: str | Any) -> SearchRecord:
        """The search a parent run (or its id) records; fields a search of an older netshrink did not record are None."""
        run = self.client.get_run(run) if isinstance(run, str) else run
        tags, params = run.data.tags, run.data.params

        return SearchRecord(
            run_id=run.info.run_id,
            objectives=json.loads(tags.get(_OBJECTIVES, json.dumps(["accuracy", "size_bytes", "latency_ms"]))),
            constraints=Constraints.from_tags(tags),
            baseline={key.removeprefix(BASELINE_PREFIX): value for key, value in run.data.metrics.items() if key.startswith(BASELINE_PREFIX)},
            study_name=tags.get(_STUDY),
            storage_url=tags.get(_STORAGE),
            config_file=tags.get(_CONFIG_FILE),
            config_sha256=tags.get(CONFIG_HASH_TAG),
            trials=int(params["trials"]) if "trials" in params else None,
            status=run.info.status,
            metric=tags.get("metric", "accuracy"),
            abandoned=tags.get(ABANDONED_TAG) == "true",
        )

    def start_trial(self, experiment_id: str, parent_run_id: str, run_name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(
            experiment_id, run_name=run_name, tags={ROLE_TAG: "trial", PARENT_TAG: parent_run_id, **tags}
        )
        return run.info.run_id

    def log(
        self, run_id: str, *, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None:
        """``step``: the metrics' step (a multi-fidelity trial's rung epochs: MLflow keeps each rung's figures as a history)."""
        now = int(time.time() * 1000)
        # MLflow caps a param value at 6000 characters and a batch at 100 params
        param_items = [Param(key, str(value)[:6000]) for key, value in flatten(params or {}).items()]
        for start in range(0, max(len(param_items), 1), 100):
            self.client.log_batch(
                run_id,
                params=param_items[start : start + 100],
                metrics=[Metric(key, float(value), now, step) for key, value in (metrics or {}).items()] if start == 0 else [],
                tags=[RunTag(key, str(value)) for key, value in (tags or {}).items()] if start == 0 else [],
            )

    def log_json(self, run_id: str, payload: Any, name: str) -> None:
        self.client.log_text(run_id, json.dumps(payload, indent=2), name)

    def log_file(self, run_id: str, path: str | os.PathLike, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, os.fspath(path), folder)

    def read_text(self, run_id: str, name: str) -> str:
        """A text artifact of the run; MLflow's own exception (several types) if it cannot be had."""
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar for one small file is noise
        with tempfile.TemporaryDirectory() as folder:
            return Path(self.client.download_artifacts(run_id, name, folder)).read_text()

    def finish(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def stopped(self, run_id: str) -> None:
        """KILLED, with the ``stopped_early`` tag the trial set: early stopping ended it (see ``netshrink/deploy/stopping.py``)."""
        self.client.set_terminated(run_id, "KILLED")

    def interrupted(self, run_id: str) -> None:
        """KILLED, not FAILED: the run did nothing wrong, it was stopped (Ctrl-C, a dead driver); ``--resume`` redoes it."""
        self.client.set_terminated(run_id, "KILLED")

    def abandon(self, run_id: str) -> None:
        """KILLED and tagged abandoned: a search that will not be resumed (``SearchRecord.abandoned``)."""
        self.log(run_id, tags={ABANDONED_TAG: "true"})
        self.client.set_terminated(run_id, "KILLED")

    def find_run(self, run_id: str):
        """The run with this id, or None where the store has none (MLflow raises different types per store for a missing run)."""
        try:
            return self.client.get_run(run_id)
        except Exception:
            return None

    def reopen(self, run_id: str) -> None:
        """RUNNING again, without the error of the attempt before."""
        self.client.update_run(run_id, status="RUNNING")
        if ERROR_TAG in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, ERROR_TAG)

    def trial_attempt(self, experiment_id: str, parent_run_id: str, tune_trial_id: str):
        """The child run an earlier attempt of this Tune trial created, if any (Tune retries a trial under the same id)."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.{TUNE_TRIAL_TAG} = '{tune_trial_id}'",
            max_results=1,
        )
        return runs[0] if runs else None

    def trial_runs(self, experiment_id: str, parent_run_id: str | None = None) -> list:
        query = f"tags.{ROLE_TAG} = 'trial'"
        if parent_run_id:
            query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
        return self.client.search_runs([experiment_id], filter_string=query, max_results=50_000)

    def latest_search(self, experiment_id: str, unfinished: bool = False) -> SearchRecord | None:
        """The newest search; with ``unfinished``, the newest that did not finish (failed, killed or still marked running)
        and was not abandoned (``netshrink search --abandon``)."""
        query = f"tags.{ROLE_TAG} = 'search'" + (" and attributes.status != 'FINISHED'" if unfinished else "")
        runs = self.client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1000)
        records = (self.search_record(run) for run in runs)
        return next((record for record in records if not (unfinished and record.abandoned)), None)
