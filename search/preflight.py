"""Checks before anything expensive: the MLflow store answers, the Ray cluster is there and a trial fits on it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from netshrink.config import Experiment
from netshrink.errors import UserError

from .tracking import Tracker


def connect_tracking(tracking_uri: str, experiment_name: str) -> tuple[Tracker, str]:
    """Reach the MLflow store now: a wrong URI or a server that is down should not cost a baseline training."""
    if tracking_uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10) as response:
                response.read()
        except OSError as error:
            raise UserError(f"--tracking-uri / tracking_uri: no MLflow server answers at {tracking_uri} ({error})") from None
    elif tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise UserError(f"--tracking-uri / tracking_uri: folder {folder} of the SQLite store does not exist")
    try:
        tracker = Tracker(tracking_uri)
        return tracker, tracker.experiment_id(experiment_name)
    except Exception as error:  # MLflow raises many types for a bad URI
        raise UserError(f"--tracking-uri / tracking_uri: cannot use MLflow store {tracking_uri!r}: {type(error).__name__}: {error}") from None


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
