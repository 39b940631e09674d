"""``netshrink export`` on real small searches: the files keep their promises outside netshrink."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from netshrink.errors import UserError
from netshrink.integrity import file_sha256
from netshrink.search.export import choose_trial, pick_from_front
from netshrink.search.front import knee_point
from netshrink.search.front import TrialPoint
from netshrink.search.tracking import Tracker
from netshrink.tasks import load_data

TASK = 'task: {model: "tinynet:make", dataset_args: {image_size: 16}, train: {epochs: 2}}'
FINETUNE = "finetune: {epochs: 1, lr: 0.003}"  # with the default lr 0.0005, one epoch leaves the exit heads too unsure to answer at 16x16
SEARCHES = {
    "plain": """
        search: {trials: 2, max_concurrent: 2, sampler: random, seed: 1}
        space:
          pruning: {granularity: channel, ratio: {low: 0.2, high: 0.6}}
          quantization: {bits: [16, 8]}
        """,
    "exits": """
        search: {trials: 1, max_concurrent: 1, sampler: random, seed: 1}
        space:
          early_exit: {enabled: true, after: "pool1+pool2", threshold: 0.8}
        """,
    "slimmable": """
        search: {trials: 1, max_concurrent: 1, sampler: random, seed: 1}
        space:
          slimmable: {enabled: true, narrowest: 0.5, count: 2}
        """,
    "static": """
        search: {trials: 1, max_concurrent: 1, sampler: random, seed: 1}
        space:
          quantization: {enabled: true, bits: 8, activations: int8}
        """,
}
# A user's own model factory: the export must import it from the experiment file's folder.
TINYNET = """
from netshrink.tasks.models import lenet5

def make(num_classes, input_shape):
    return lenet5(num_classes=num_classes, in_channels=input_shape[0], image_size=input_shape[-1])
"""
# Runs in a separate interpreter that must never load torch or netshrink.
ONNX_ONLY = """
import json, sys
import numpy as np
import onnxruntime as ort

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
names = [output.name for output in session.get_outputs()]
data = np.load(sys.argv[2])
correct, exits = 0, []
for sample, label in zip(data["inputs"], data["labels"]):
    outputs = dict(zip(names, session.run(None, {"input": sample[None]})))
    correct += int(outputs["logits"].argmax(axis=1)[0] == label)
    if "exit" in outputs:
        exits.append(int(outputs["exit"]))
assert "torch" not in sys.modules and "netshrink" not in sys.modules
print(json.dumps({"accuracy": correct / len(data["labels"]), "exits": exits}))
"""


def netshrink(*args, cwd):
    return subprocess.run([sys.executable, "-m", "netshrink.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Four searches in one folder (they share the cached baseline): plain, with early exits, slimmable, static int8."""
    folder = tmp_path_factory.mktemp("export")
    (folder / "tinynet.py").write_text(TINYNET)
    for name, rest in SEARCHES.items():
        (folder / f"{name}.yaml").write_text(f"name: {name}\n{TASK}\n{FINETUNE}\nmeasure: {{warmup: 5, repeats: 100}}{textwrap.dedent(rest)}")
        result = netshrink("search", f"{name}.yaml", cwd=folder)
        assert result.returncode == 0, result.stdout + result.stderr
    return folder


@pytest.fixture(scope="module")
def client(workdir):
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def trials(client, experiment):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.`netshrink.role` = 'trial'")
    return {run.info.run_id: run for run in runs}


@pytest.fixture(scope="module")
def plain_export(workdir):
    result = netshrink("export", "--experiment", "plain", "--pick", "knee", "--out", "shipped", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir / "shipped", result.stdout


@pytest.fixture(scope="module")
def exits_export(workdir):
    result = netshrink("export", "-e", "exits", "--pick", "accuracy", "--out", "exits-out", "--register", "digits-exits", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir / "exits-out", result.stdout


@pytest.fixture(scope="module")
def static_export(workdir):
    result = netshrink("export", "-e", "static", "--pick", "accuracy", "--out", "static-out", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir / "static-out", result.stdout


@pytest.fixture(scope="module")
def slimmable_export(workdir):
    result = netshrink("export", "-e", "slimmable", "--pick", "fastest", "--out", "slim-out", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir / "slim-out", result.stdout


def exported_run_id(stdout: str) -> str:
    return re.search(r"\(run ([0-9a-f]{32})\)", stdout).group(1)


def run_onnx_alone(folder: Path, tmp_path: Path, graph: str = "model.onnx") -> dict:
    """The validation split through ``graph`` in an interpreter with only numpy and onnxruntime."""
    val = load_data("digits", {"image_size": 16}).val
    inputs = np.stack([np.asarray(val[i][0], dtype=np.float32) for i in range(len(val))])
    labels = np.array([int(val[i][1]) for i in range(len(val))])
    np.savez(tmp_path / "val.npz", inputs=inputs, labels=labels)
    (tmp_path / "onnx_only.py").write_text(ONNX_ONLY)
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "onnx_only.py"), str(folder / graph), str(tmp_path / "val.npz")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_exported_onnx_runs_with_onnxruntime_alone_at_the_reported_accuracy(plain_export, client, tmp_path):
    folder, stdout = plain_export
    run = trials(client, "plain")[exported_run_id(stdout)]
    measured = run_onnx_alone(folder, tmp_path)
    print(f"reported accuracy {run.data.metrics['accuracy']:.4f}, model.onnx in a separate process {measured['accuracy']:.4f}")
    assert abs(measured["accuracy"] - run.data.metrics["accuracy"]) <= 0.001  # within 0.1 points
    assert measured["exits"] == []


def test_the_artifact_is_the_logged_file_and_its_size_is_size_bytes(plain_export, client, tmp_path):
    folder, stdout = plain_export
    run = trials(client, "plain")[exported_run_id(stdout)]
    logged = Path(client.download_artifacts(run.info.run_id, "compressed.safetensors", str(tmp_path)))
    assert (folder / "compressed.safetensors").read_bytes() == logged.read_bytes()
    assert os.path.getsize(folder / "compressed.safetensors") == run.data.metrics["size_bytes"]
    assert json.loads((folder / "recipe.json").read_text())["steps"]


def test_model_card_gives_real_file_sizes_metrics_and_a_snippet_that_runs_alone(plain_export, client, tmp_path):
    folder, stdout = plain_export
    run = trials(client, "plain")[exported_run_id(stdout)]
    card = (folder / "MODEL_CARD.md").read_text()
    assert sorted(os.listdir(folder)) == ["MODEL_CARD.md", "compressed.safetensors", "model.onnx", "recipe.json"]
    for name in ("model.onnx", "compressed.safetensors", "recipe.json"):  # bytes and SHA-256 of the files as written
        assert f"| `{name}` | {os.path.getsize(folder / name):,} | `{file_sha256(folder / name)}` |" in card
    assert run.data.tags["artifact_sha256"] == file_sha256(folder / "compressed.safetensors")  # the trial recorded it
    assert f"{run.data.metrics['accuracy']:.2%}" in card and run.data.tags["recipe_summary"] in card
    assert "x smaller" in card and ("x faster" in card or "x slower" in card) and "baseline" in card
    assert "the knee of the front" in card and "load_artifact" in card and "'tinynet:make'" in card
    snippet = re.search(r"```python\n(import numpy.*?)```", card, re.S).group(1)
    (tmp_path / "snippet.py").write_text(snippet + 'import sys\nassert "torch" not in sys.modules\n')
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "snippet.py")], capture_output=True, text=True, cwd=folder, timeout=60)
    assert result.returncode == 0, result.stderr


def test_early_exits_export_as_one_graph_whose_exit_output_matches_the_logged_shares(exits_export, client, tmp_path):
    folder, stdout = exits_export
    run = trials(client, "exits")[exported_run_id(stdout)]
    measured = run_onnx_alone(folder, tmp_path)
    metrics = run.data.metrics
    assert abs(measured["accuracy"] - metrics["accuracy"]) <= 0.001
    exits = np.array(measured["exits"])
    print(f"exit shares logged {[round(metrics[f'exit_share_{i}'], 4) for i in range(3)]}, model.onnx in a separate process "
          f"{[round(float((exits == i).mean()), 4) for i in range(3)]}; accuracy {metrics['accuracy']:.4f} vs {measured['accuracy']:.4f}")
    assert len(set(exits.tolist())) > 1  # some samples really leave early
    for index in range(3):
        assert (exits == index).mean() == pytest.approx(metrics[f"exit_share_{index}"], abs=1.5 / len(exits))
    card = (folder / "MODEL_CARD.md").read_text()
    assert "`exit`" in card and "0 = the exit after `pool1`" in card and "2 = the full network" in card


def test_register_creates_a_model_version_linked_to_the_trial_with_its_metrics(exits_export, client):
    _, stdout = exits_export
    assert "Registered in MLflow as model 'digits-exits', version 1" in stdout
    (version,) = client.search_model_versions("name = 'digits-exits'")
    run = trials(client, "exits")[exported_run_id(stdout)]
    assert version.run_id == run.info.run_id
    assert float(version.tags["accuracy"]) == run.data.metrics["accuracy"]
    assert int(version.tags["size_bytes"]) == run.data.metrics["size_bytes"]
    assert version.description.startswith("# exits: ")  # the model card


def test_picks_on_a_front():
    front = [
        TrialPoint("a", "a", 0.99, 1000, 1.0, "{}", ""),
        TrialPoint("b", "b", 0.97, 200, 0.5, "{}", ""),
        TrialPoint("c", "c", 0.60, 100, 0.4, "{}", ""),
    ]
    objectives = ["accuracy", "size_bytes", "latency_ms"]
    assert {pick: pick_from_front(front, pick, objectives).name for pick in ("accuracy", "smallest", "fastest", "knee")} == {
        "accuracy": "a",
        "smallest": "c",
        "fastest": "c",
        "knee": "b",
    }
    assert knee_point(front, ["accuracy", "size_bytes"]).name == "b"
    level = [TrialPoint("x", "x", 0.9, 10, 1.0, "{}", ""), TrialPoint("y", "y", 0.9, 10, 1.0, "{}", "")]
    assert knee_point(level, objectives).name == "x"  # no spread anywhere: no division by zero


def test_min_accuracy_restricts_the_candidates_and_a_run_id_picks_any_finished_trial(workdir, client):
    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = trials(client, "plain")
    best = max(run.data.metrics["accuracy"] for run in runs.values())
    assert choose_trial(tracker, "plain", "smallest", best, None).point.accuracy == best
    for run_id in runs:
        assert choose_trial(tracker, "plain", run_id, None, None).point.run_id == run_id
    (other,) = trials(client, "exits")
    with pytest.raises(UserError, match="is not a trial of experiment 'plain'"):
        choose_trial(tracker, "plain", other, None, None)


@pytest.fixture(scope="module")
def empty_search(client):
    """A search whose trials never finished."""
    client.create_run(client.create_experiment("empty"), tags={"netshrink.role": "search"})


@pytest.mark.parametrize(
    "args, expected",
    [
        (["-e", "nope", "--pick", "knee"], "no MLflow experiment named 'nope'"),
        (["-e", "empty", "--pick", "knee"], "has no finished trials"),
        (["-e", "plain", "--pick", "fastest", "--min-accuracy", "1"], "--min-accuracy 1.0: no trial on the front"),
        (["-e", "plain", "--pick", "knee", "--min-accuracy", "95"], "--min-accuracy: must be a fraction in [0, 1]"),
        (["-e", "plain", "--pick", "0" * 32], "no MLflow run has that id"),
    ],
)
def test_mistakes_end_with_exit_code_2_and_one_clear_line(args, expected, workdir, empty_search, monkeypatch, capsys):
    """The CLI's own entry point, in this process: a mistake ends in exit code 2 and a message, never an exception."""
    from netshrink import cli

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the command sets it; keep it out of this process
    monkeypatch.setattr(sys, "argv", ["netshrink", "export", *args, "--out", "never"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (workdir / "never").exists()


def test_a_full_out_folder_and_a_model_that_no_longer_imports_are_refused_without_traceback(workdir, tmp_path):
    (workdir / "full").mkdir()
    (workdir / "full" / "keep.txt").write_text("mine")
    full = netshrink("export", "-e", "plain", "--pick", "knee", "--out", "full", cwd=workdir)
    assert full.returncode == 2 and "--out: folder full exists and is not empty" in full.stderr and "Traceback" not in full.stderr
    assert os.listdir(workdir / "full") == ["keep.txt"]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    # from another folder: the search logged where its experiment file is, tinynet.py is found there
    elsewhere = netshrink("export", "-e", "plain", "--pick", "knee", "--out", "out", "--tracking-uri", uri, cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stdout + elsewhere.stderr
    assert (tmp_path / "out" / "model.onnx").is_file()
    shutil.rmtree(tmp_path / "out")
    # once tinynet.py is gone, the model cannot be rebuilt
    (workdir / "tinynet.py").rename(workdir / "tinynet.py.moved")
    try:
        moved = netshrink("export", "-e", "plain", "--pick", "knee", "--out", "out", "--tracking-uri", uri, cwd=tmp_path)
    finally:
        (workdir / "tinynet.py.moved").rename(workdir / "tinynet.py")
    assert moved.returncode == 2 and "Traceback" not in moved.stderr
    assert "cannot rebuild the model" in moved.stderr and "No module named 'tinynet'" in moved.stderr
    assert os.listdir(tmp_path) == []  # nothing left behind, not even a partial folder


def test_a_static_int8_trial_exports_the_qdq_model_it_measured(static_export, client, tmp_path):
    """Export recalibrates on the same samples as the trial: the file outside netshrink gives the logged ONNX accuracy."""
    import onnx

    folder, stdout = static_export
    run = trials(client, "static")[exported_run_id(stdout)]
    assert json.loads((folder / "recipe.json").read_text())["steps"][0]["activations"] == "int8"
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    measured = run_onnx_alone(folder, tmp_path)
    assert measured["accuracy"] == pytest.approx(run.data.metrics["onnx_accuracy"], abs=1e-9)
    assert abs(measured["accuracy"] - run.data.metrics["accuracy"]) <= 0.005
    assert "session.disable_quant_qdq" not in (folder / "MODEL_CARD.md").read_text()


def stored_artifact(run) -> Path:
    """The trial's compressed.safetensors in the local MLflow artifact store."""
    from urllib.parse import urlparse

    return Path(urlparse(run.info.artifact_uri).path) / "compressed.safetensors"


@pytest.mark.parametrize("how", ["zeroed", "truncated"])
def test_a_damaged_artifact_in_the_store_is_refused_naming_it_and_nothing_is_written(workdir, client, how):
    from tests.search.test_baseline import damaged

    run_id, run = next(iter(trials(client, "plain").items()))
    path = stored_artifact(run)
    sound = path.read_bytes()
    try:
        damaged(path, how)
        result = netshrink("export", "-e", "plain", "--pick", run_id, "--out", f"damaged-{how}", cwd=workdir)
    finally:
        path.write_bytes(sound)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(path) in result.stderr and "SHA-256" in result.stderr and "--pick" in result.stderr, result.stderr
    assert not (workdir / f"damaged-{how}").exists() and not list(workdir.glob(f".damaged-{how}.partial-*"))


def test_a_model_onnx_scoring_other_than_logged_is_refused_and_force_writes_it_with_a_warning_on_the_card(workdir, client):
    run_id, run = next(iter(trials(client, "plain").items()))
    logged = run.data.metrics["onnx_accuracy"]
    # the value at the highest step is the run's figure (a trial logs at step = its rung's epochs): what export compares with
    client.log_metric(run_id, "onnx_accuracy", logged - 0.3, step=1_000)
    try:
        refused = netshrink("export", "-e", "plain", "--pick", run_id, "--out", "unfaithful", cwd=workdir)
        forced = netshrink("export", "-e", "plain", "--pick", run_id, "--out", "forced", "--force", cwd=workdir)
    finally:
        client.log_metric(run_id, "onnx_accuracy", logged, step=1_001)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and not (workdir / "unfaithful").exists(), refused.stderr
    both = [f"{logged:.2%}", f"{logged - 0.3:.2%}"]
    assert all(figure in refused.stderr for figure in both) and "--force" in refused.stderr, refused.stderr
    assert forced.returncode == 0, forced.stderr
    card = (workdir / "forced" / "MODEL_CARD.md").read_text()
    assert "exported with `--force`:** model.onnx scores" in card and all(figure in card for figure in both) and "warning (--force)" in forced.stderr


def test_a_slimmable_trial_exports_a_graph_per_width_over_one_weight_file_each_at_its_logged_accuracy(slimmable_export, client, workdir, tmp_path):
    folder, stdout = slimmable_export
    run = trials(client, "slimmable")[exported_run_id(stdout)]
    metrics = run.data.metrics
    assert "trial-000@0.5" in stdout and "model.width_0.5.onnx" in stdout  # the fastest point: the narrow width's own graph
    assert sorted(os.listdir(folder)) == ["MODEL_CARD.md", "compressed.safetensors", "model.onnx", "model.weights", "model.width_0.5.onnx", "recipe.json"]
    for width, graph in ((0.5, "model.width_0.5.onnx"), (1.0, "model.onnx")):  # onnxruntime alone, every width
        measured = run_onnx_alone(folder, tmp_path, graph)
        assert abs(measured["accuracy"] - metrics[f"width_{width:g}/onnx_accuracy"]) <= 0.001
        assert abs(measured["accuracy"] - metrics[f"width_{width:g}/accuracy"]) <= 0.001  # the sliced torch network the trial scored
    assert metrics["width_0.5/latency_ms"] < metrics["width_1/latency_ms"]
    # the weights once: the one weight file holds what the artifact holds (float32 here), the graphs only indices and statistics
    assert os.path.getsize(folder / "model.weights") <= metrics["size_bytes"] < 1.01 * os.path.getsize(folder / "model.weights")
    assert os.path.getsize(folder / "model.width_0.5.onnx") < 0.05 * metrics["size_bytes"]
    card = (folder / "MODEL_CARD.md").read_text()
    assert "## Widths" in card and "| 0.5 (picked) | `model.width_0.5.onnx` |" in card and "ort.InferenceSession('model.width_0.5.onnx')" in card
    # a width named by its run id and the width, as the front lists it
    again = netshrink("export", "-e", "slimmable", "--pick", f"{run.info.run_id[:8]}@1", "--out", "slim-wide", cwd=workdir)
    assert again.returncode == 0 and "trial-000@1 " in again.stdout, again.stdout + again.stderr
    wrong = netshrink("export", "-e", "slimmable", "--pick", f"{run.info.run_id[:8]}@0.3", "--out", "slim-none", cwd=workdir)
    assert wrong.returncode == 2 and "has no width '0.3': its widths are 0.5, 1" in wrong.stdout + wrong.stderr
