"""Real servers for tests that talk to them over HTTP: ``mlflow server`` on 127.0.0.1, and plain REST calls to it.

The checks speak plain HTTP, not ``MlflowClient``, so they see what the server holds and nothing a
client-side fallback could have written to a local store.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

SERVER_START_SECONDS = 60  # about 5-7 s when idle; the margin is for a busy 2-core machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its worker), SIGKILL it if it lingers."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=15)


@contextmanager
def mlflow_server(home: Path) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` on 127.0.0.1 with its own SQLite store and proxied artifact folder in ``home``; always stopped.

    Yields the server's URL and its artifact folder.
    """
    with mlflow_server_process(home) as (url, artifacts, _):
        yield url, artifacts


@contextmanager
def mlflow_server_process(home: Path) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """``mlflow_server``, with the server's process too (``stop`` ends it early)."""
    artifacts = home / "artifacts"
    url = f"http://127.0.0.1:{free_port()}"
    log = (home / "server.log").open("w")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{home / 'server.db'}"]
    command += ["--serve-artifacts", "--artifacts-destination", artifacts.as_uri()]
    command += ["--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    # job execution starts extra workers: about 3 GB of memory instead of 0.5 GB
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n{(home / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {SERVER_START_SECONDS} s:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, artifacts, process
    finally:
        stop(process)
        log.close()


def api(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """GET with ``query`` or POST ``body`` as JSON to ``/api/2.0/mlflow/<endpoint>``."""
    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        address += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def tags(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def metrics(run: dict) -> dict[str, float]:
    return {metric["key"]: metric["value"] for metric in run["data"].get("metrics", [])}


def artifact_files(url: str, run: dict) -> dict[str, int]:
    listing = api(url, "artifacts/list", run_id=run["info"]["run_id"])
    return {entry["path"]: int(entry.get("file_size", -1)) for entry in listing.get("files", []) if not entry.get("is_dir")}


def download(url: str, run: dict, name: str) -> bytes:
    """Through the server's artifact proxy, where ``mlflow-artifacts:/<path>`` lives."""
    root = urllib.parse.urlparse(run["info"]["artifact_uri"]).path.strip("/")
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow-artifacts/artifacts/{root}/{name}", timeout=30) as response:
        return response.read()
