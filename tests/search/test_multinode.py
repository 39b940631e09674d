"""Multi-node on one machine: a search joins a Ray cluster of two nodes and logs to ``mlflow server`` over HTTP.

The head and a second node are started with the real ``ray start``, each with one CPU, so two
trials at a time must use both. The CLI joins them with ``--address``; the checks read the runs
back through the tracking server's REST API, including the node each trial ran on.

Other Ray instances may run on the same machine (other test runs): the cluster gets its own temp
dir and free ports, and is torn down by ending the processes of the sessions its nodes were
started in, never with ``ray stop`` (which stops every Ray of this user).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.search.servers import api, artifact_files, download, free_port, metrics, mlflow_server, tags
from tests.models import applied_agrees_with_sampled

TRIALS = 4
EXPERIMENT = f"""
name: multinode
task: {{dataset_args: {{image_size: 16}}, train: {{epochs: 1}}}}
finetune: {{epochs: 1}}
search: {{trials: {TRIALS}, max_concurrent: 2, sampler: random, seed: 5, early_stopping: false}}  # where trials run, not how they end: none stops
resources: {{cpu: 1}}
measure: {{warmup: 5, repeats: 50}}
space:
  pruning: {{ratio: {{low: 0.3, high: 0.8}}}}
  quantization: {{bits: [16, 8]}}
"""
NODES_UP_SECONDS = 180  # both nodes registered: about 10 s when idle, the margin is for a busy 2-core machine
# every port Ray would otherwise take from a fixed default (6379, 52365, ...) is picked at random (0), so the
# two nodes and any other Ray on this machine do not collide
NODE_OPTIONS = [
    "--block",
    "--num-cpus=1",
    "--num-gpus=0",
    "--node-ip-address=127.0.0.1",
    "--node-manager-port=0",
    "--object-manager-port=0",
    "--min-worker-port=0",
    "--max-worker-port=0",
    "--dashboard-agent-listen-port=0",
    "--dashboard-agent-grpc-port=0",
    "--runtime-env-agent-port=0",
    "--metrics-export-port=0",
    "--object-store-memory=100000000",
    "--disable-usage-stats",
]


@dataclass
class RayCluster:
    address: str
    node_ids: set[str]
    env: dict[str, str]


def private_env() -> dict[str, str]:
    """No inherited RAY_ADDRESS or other Ray settings; no token authentication (it reads a token file in the home folder)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    return {**env, "RAY_AUTH_MODE": "disabled"}


def start_node(temp_dir: Path, env: dict[str, str], *options: str) -> subprocess.Popen:
    """``ray start --block`` in a session of its own; every process of the node stays in that session (see ``leftovers``)."""
    temp_dir.mkdir()
    log = (temp_dir / "start.log").open("w")
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--temp-dir={temp_dir}", *NODE_OPTIONS, *options]
    try:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def alive_nodes(address: str, env: dict[str, str]) -> set[str]:
    """Ids of the cluster's live nodes with a CPU, asked by a short driver of its own (the test process stays out of Ray)."""
    code = (
        "import json, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')]))\n"
    )
    try:
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return set()
    lines = result.stdout.strip().splitlines()
    return set(json.loads(lines[-1])) if result.returncode == 0 and lines else set()


def leftovers(sessions: set[int], temp_root: Path) -> list[tuple[int, str]]:
    """Processes still in the nodes' sessions or naming the cluster's temp dir in their arguments.

    By session, not by process group: Ray puts each worker in a process group of its own.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
                continue  # exited, waiting to be reaped
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if os.getsid(pid) in sessions or str(temp_root) in command:
                found.append((pid, command[:200]))
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile
    return found


def stop_nodes(nodes: list[subprocess.Popen], temp_root: Path, grace: float = 5) -> list[tuple[int, str]]:
    """SIGTERM each node's process group, SIGKILL whatever of its sessions lingers; returns what still runs after that.

    The leaders are reaped only at the end, so no other process can take their ids (the group and session ids)
    meanwhile. ``grace`` is short: 25 s after SIGTERM, ``ray start --block``, gcs_server and an idle worker were
    seen still running, and nothing of the cluster is kept.
    """
    sessions = {node.pid for node in nodes}
    for node in nodes:
        try:
            os.killpg(node.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while leftovers(sessions, temp_root) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid, _ in leftovers(sessions, temp_root):  # in our sessions or naming our temp dir: ours to end
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for node in nodes:
        node.wait(timeout=30)
    time.sleep(1)
    return leftovers(sessions, temp_root)


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, one CPU each, on 127.0.0.1; stopped and checked for leftovers afterwards.

    The temp dir is short on purpose: Ray puts Unix sockets in it, and their paths are limited to about 100 bytes.
    """
    env = private_env()
    temp_root = Path(tempfile.mkdtemp(prefix="nsr-", dir="/tmp"))
    address = f"127.0.0.1:{free_port()}"
    nodes = [start_node(temp_root / "head", env, "--head", f"--port={address.rsplit(':', 1)[1]}", "--include-dashboard=false")]
    try:
        nodes.append(start_node(temp_root / "worker", env, f"--address={address}"))
        deadline = time.monotonic() + NODES_UP_SECONDS
        node_ids: set[str] = set()
        while len(node_ids) < 2:
            exited = [node for node in nodes if node.poll() is not None]
            if exited or time.monotonic() > deadline:
                logs = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in sorted(temp_root.glob("*/start.log")))
                pytest.fail(f"two Ray nodes not up after {NODES_UP_SECONDS} s (live: {sorted(node_ids)}):\n{logs}")
            time.sleep(1)
            node_ids = alive_nodes(address, env)
        yield RayCluster(address, node_ids, env)
    finally:
        stray = stop_nodes(nodes, temp_root)
        shutil.rmtree(temp_root, ignore_errors=True)
    assert not stray, f"still running after the nodes were stopped (now killed): {stray}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


@pytest.fixture(scope="module")
def finished_search(cluster, server, tmp_path_factory):
    url, _ = server
    workdir = tmp_path_factory.mktemp("multinode-search")
    (workdir / "exp.yaml").write_text(textwrap.dedent(EXPERIMENT))
    command = [sys.executable, "-m", "netshrink.cli", "search", "exp.yaml", "--address", cluster.address, "--tracking-uri", url]
    result = subprocess.run(command, env=cluster.env, capture_output=True, text=True, cwd=workdir, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    experiment = api(url, "experiments/get-by-name", experiment_name="multinode")["experiment"]
    runs = api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    parents = [r for r in runs if tags(r).get("netshrink.role") == "search"]
    children = [r for r in runs if tags(r).get("netshrink.role") == "trial"]
    return url, parents, children


def test_the_cluster_has_two_nodes(cluster):
    assert len(cluster.node_ids) == 2


def test_the_search_run_finished_with_every_trial(finished_search):
    _, parents, children = finished_search
    (parent,) = parents
    assert parent["info"]["status"] == "FINISHED"
    assert metrics(parent)["trials_finished"] == TRIALS
    assert len(children) == TRIALS


def test_every_trial_run_arrived_with_its_metrics_and_artifacts(finished_search):
    url, parents, children = finished_search
    for child in children:
        assert child["info"]["status"] == "FINISHED"
        assert tags(child)["mlflow.parentRunId"] == parents[0]["info"]["run_id"]
        values = metrics(child)
        for key in ("accuracy", "size_bytes", "latency_ms"):
            assert key in values, key
        files = artifact_files(url, child)
        assert {"recipe.json", "compressed.safetensors"} <= files.keys()
        # the server holds the whole file, whichever node sent it
        assert files["compressed.safetensors"] == values["size_bytes"]
        assert len(download(url, child, "compressed.safetensors")) == values["size_bytes"]
        assert applied_agrees_with_sampled(json.loads(download(url, child, "recipe.json")), json.loads(tags(child)["recipe"]))


def test_trials_ran_on_both_nodes(cluster, finished_search):
    _, _, children = finished_search
    assert {tags(child)["ray_node_id"] for child in children} == cluster.node_ids
