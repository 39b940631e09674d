"""Checks before anything expensive: the MLflow store answers, the Ray cluster is there and a trial fits on it."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

from netshrink.config import Experiment
from netshrink.errors import UserError, disk_full
from netshrink.node_lock import exclusive_file

from .tracking import DEFAULT_TIMEOUT_S, Tracker, ping


def connect_tracking(
    tracking_uri: str, experiment_name: str, timeout_s: float = DEFAULT_TIMEOUT_S, log=print, lock: Path | None = None
) -> tuple[Tracker, str]:
    """Reach the MLflow store now: a wrong URI or a server that is down should not cost a baseline training.

    A local SQLite store is created (on first use) under the file lock ``lock``, so two searches started
    at once in one folder do not both run its schema migrations; one whose first creation was cut short
    (a full disk, a kill) is reported with what to do (``half_created``).
    """
    if tracking_uri.startswith(("http://", "https://")):
        try:
            ping(tracking_uri, timeout_s=10)
        except OSError as error:
            raise UserError(f"--tracking-uri / tracking_uri: no MLflow server answers at {tracking_uri} ({error})") from None
    elif tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise UserError(f"--tracking-uri / tracking_uri: folder {folder} of the SQLite store does not exist")
    try:
        with exclusive_file(lock, "Waiting for another search, which is creating the MLflow store ...", log) if lock else nullcontext():
            tracker = Tracker(tracking_uri, timeout_s=timeout_s, log=log)
            return tracker, tracker.experiment_id(experiment_name)
    except UserError:
        raise
    except Exception as error:  # MLflow raises many types for a bad URI
        if disk_full(error):
            raise
        problem = half_created(tracking_uri, error)
        if problem:
            raise UserError(problem) from None
        raise UserError(f"--tracking-uri / tracking_uri: cannot use MLflow store {tracking_uri!r}: {type(error).__name__}: {error}") from None


SCHEMA_ERRORS = ("already exists", "duplicate column", "out-of-date database schema", "no such table", "no such column")


def half_created(tracking_uri: str, error: BaseException) -> str | None:
    """What to do about a SQLite MLflow store whose schema is incomplete, if ``error`` says it is; None otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    text = str(error)
    if not any(phrase in text for phrase in SCHEMA_ERRORS):
        return None
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    import sqlite3

    try:
        with sqlite3.connect(path) as connection:
            runs = connection.execute("select count(*) from runs").fetchone()[0]
        held = f"it holds {runs} run(s)"
    except sqlite3.Error:
        runs, held = 0, "it holds no runs"
    first = text.strip().splitlines()[0][:160]
    advice = (
        f"if none of them matters (a store this broken often holds none), delete it and run again: rm {path}"
        if runs else f"delete it and run again: rm {path}"
    )
    return (
        f"MLflow store {path} is half-created ({first}): its first creation was cut short, by a full disk or a killed "
        f"process, and MLflow cannot finish it. {held[0].upper()}{held[1:]}; {advice}"
    )


def start_ray(address: str | None, search_path: str, experiment: Experiment) -> None:
    """Start a local Ray, or join ``address``; check that one trial's resources fit somewhere."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address not in (None, "auto", "local"):
        probe_address(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [search_path, os.environ.get("PYTHONPATH")]))}},
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UserError(f"--address: cannot connect to a Ray cluster at {address!r}: {error}") from None
    if address is None:  # a local Ray has all the resources it will ever have; a cluster may autoscale
        available = ray.cluster_resources()
        wanted = experiment.resources
        problems = []
        if wanted.cpu > available.get("CPU", 0):
            problems.append(f"resources.cpu: a trial asks for {wanted.cpu} CPUs, this machine has {available.get('CPU', 0):g}")
        if wanted.gpu > available.get("GPU", 0):
            problems.append(f"resources.gpu: a trial asks for {wanted.gpu} GPUs, this machine has {available.get('GPU', 0):g}")
        if problems:
            ray.shutdown()
            raise UserError(problems, title="trials could never start")


def probe_address(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at a Ray address (``ray.init`` retries for long)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address: expected 'auto', 'HOST:PORT' or 'ray://HOST:PORT', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserError(f"--address: cannot connect to a Ray cluster at {address!r}: {error}") from None
