"""cluster.yaml is a cluster file Ray's launcher accepts, laid out as docs/cluster.md describes.

``ray up`` prepares a cluster file (merges the provider's defaults, fills in
per-type worker counts) and validates it against Ray's JSON schema before it
asks the cloud for anything; the same two calls run here, offline, without
cloud credentials.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILE = ROOT / "cluster.yaml"


def raw_config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_FILE.read_text())


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does to the file before it contacts the cloud; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict[str, Any]:
    return ray_validate(raw_config())


def gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"] and node["resources"].get("GPU", 0) >= 1
    }


def pinned_torch() -> str:
    """``torch==X`` as pyproject.toml pins it (read as text: tomllib needs Python 3.11, netshrink supports 3.10)."""
    [pin] = re.findall(r'"(torch\s*==[^"]+)"', (ROOT / "pyproject.toml").read_text())
    return pin.replace(" ", "")


def index_of(commands: list[str], pattern: str) -> int:
    matches = [i for i, command in enumerate(commands) if re.search(pattern, command)]
    assert matches, f"no command matches {pattern!r} in {commands}"
    return matches[0]


def test_ray_accepts_the_cluster_file(prepared):
    assert prepared["provider"]["type"] == "aws"


def test_the_head_has_no_gpus_and_runs_no_trials(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0  # trials need a CPU, so none is placed on the head
    assert head["max_workers"] == 0


def test_a_gpu_worker_type_scales_between_its_min_and_max(prepared):
    workers = gpu_worker_types(prepared)
    assert workers, "no worker type declares GPU resources"
    for name, node in workers.items():
        raw = raw_config()["available_node_types"][name]
        assert "min_workers" in raw and "max_workers" in raw, f"{name}: state min_workers and max_workers"
        assert 0 <= node["min_workers"] <= node["max_workers"] <= prepared["max_workers"] and node["max_workers"] >= 1


def test_gpu_workers_install_the_pinned_cuda_torch_before_netshrink(prepared):
    mount = next(remote for remote, local in prepared["file_mounts"].items() if local == ".")
    commands = prepared["worker_setup_commands"]  # the common setup_commands merged in, as on the node
    cuda_torch = index_of(commands, re.escape(pinned_torch()) + r"\s+--index-url\s+https://download\.pytorch\.org/whl/cu\d+")
    netshrink = index_of(commands, rf"pip install -e {re.escape(mount)}(\s|$)")
    assert cuda_torch < netshrink


def test_the_head_installs_netshrink_and_what_the_aws_autoscaler_needs(prepared):
    mount = next(remote for remote, local in prepared["file_mounts"].items() if local == ".")
    commands = prepared["head_setup_commands"]
    assert index_of(commands, re.escape(pinned_torch())) < index_of(commands, rf"pip install -e {re.escape(mount)}(\s|$)")
    index_of(commands, r"boto3")


def test_every_node_runs_the_ray_version_the_project_is_tested_with(prepared):
    for key in ("head_setup_commands", "worker_setup_commands"):
        index_of(prepared[key], re.escape(f'"ray[default]=={ray.__version__}"'))


def test_the_checkout_is_mounted_and_its_ignored_files_are_left_behind(prepared):
    assert "." in prepared["file_mounts"].values()
    assert ".gitignore" in prepared["rsync_filter"]


def test_the_docs_give_the_same_cuda_torch_install():
    [command] = [c for c in raw_config()["worker_setup_commands"] if "download.pytorch.org/whl/cu" in c]
    assert command.removeprefix("pip install ").strip() in (ROOT / "docs" / "cluster.md").read_text()


def test_no_server_it_starts_or_documents_listens_on_every_interface():
    text = CLUSTER_FILE.read_text()
    hosts = re.findall(r"--(?:dashboard-)?host[= ]+(\S+)", text)  # commands and the documented mlflow server alike
    assert "mlflow server" in text and "--host 127.0.0.1" in text
    assert "--dashboard-host=127.0.0.1" in " ".join(raw_config()["head_start_ray_commands"])
    assert not [host for host in hosts if host.strip("'\"") in {"0.0.0.0", "::", "[::]"}]


def _misspell_setup(config):
    config["setup_comands"] = config.pop("setup_commands")


def _gpu_fraction(config):
    next(iter(gpu_worker_types(config).values()))["resources"]["GPU"] = 0.5


def _workers_as_text(config):
    next(iter(gpu_worker_types(config).values()))["min_workers"] = "one"


def _unknown_node_key(config):
    next(iter(gpu_worker_types(config).values()))["min_worker"] = 1


def _head_type_missing(config):
    config["head_node_type"] = "no-such-type"


def _more_min_than_max(config):
    config["max_workers"] = 0


@pytest.mark.parametrize(
    "breakage", [_misspell_setup, _gpu_fraction, _workers_as_text, _unknown_node_key, _head_type_missing, _more_min_than_max]
)
def test_ray_rejects_a_broken_copy(breakage: Callable[[dict[str, Any]], None]):
    config = raw_config()
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)
