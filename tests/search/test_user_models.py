"""The model a user already has: trained weights, dict batches, two inputs, their own loss and metric.

Each case runs as a user would: ``netshrink validate``, a search on the real stack (local Ray,
Optuna, SQLite MLflow) with several techniques, ``front --json``, ``export``, and the exported
``model.onnx`` run with onnxruntime and numpy alone, reproducing the metric the trial logged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from mlflow.tracking import MlflowClient

USERLAND = Path(__file__).parent / "userland" / "user_tasks.py"
FAST = "finetune: {epochs: 1}\nmeasure: {warmup: 10, repeats: 50}\nsearch: {trials: 3, max_concurrent: 2, sampler: random, seed: 1, informed_start: false, early_stopping: false}\n"


def netshrink(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netshrink.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def workdir_with(tmp_path: Path, experiment: str) -> Path:
    shutil.copy(USERLAND, tmp_path / "user_tasks.py")
    (tmp_path / "exp.yaml").write_text(textwrap.dedent(experiment) + FAST)
    return tmp_path


def search_and_export(workdir: Path, name: str) -> tuple[dict, dict, Path]:
    """validate, search, front --json and export --pick knee; returns (the baseline's figures, the exported trial's
    logged metrics, the export folder)."""
    for args in (("validate", "exp.yaml"), ("search", "exp.yaml")):
        result = netshrink(*args, cwd=workdir)
        assert result.returncode == 0, result.stdout + result.stderr
    front = netshrink("front", "-e", name, "--json", cwd=workdir)
    assert front.returncode == 0, front.stderr
    rows = json.loads(front.stdout)
    assert rows, "the search found a front"
    exported = netshrink("export", "-e", name, "--pick", "knee", "--out", "out", cwd=workdir)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(run for run in runs if run.data.tags.get("netshrink.role") == "search")
    trials = [run for run in runs if run.data.tags.get("netshrink.role") == "trial"]
    assert trials and all(run.info.status == "FINISHED" for run in trials)
    trial = next(run for run in trials if f"(run {run.info.run_id})" in exported.stdout)
    baseline = {key.removeprefix("baseline_"): value for key, value in parent.data.metrics.items() if key.startswith("baseline_")}
    return baseline, trial.data.metrics, workdir / "out"


def onnx_logits(folder: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """model.onnx run with onnxruntime alone, one sample per call, in the session options its card names."""
    options = ort.SessionOptions()
    card = (folder / "MODEL_CARD.md").read_text()
    if "session.disable_quant_qdq" in card:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], feed)[0] for feed in feeds])


def test_trained_weights_are_the_baseline_as_given_and_the_export_reproduces_the_logged_accuracy(tmp_path):
    sys.path.insert(0, str(USERLAND.parent))
    try:
        from user_tasks import small_cnn
    finally:
        sys.path.remove(str(USERLAND.parent))
    from netshrink.tasks.datasets import digits
    from netshrink.training import accuracy, train

    data = digits(image_size=8)
    model = small_cnn()
    train(model, data.train, epochs=4, lr=3e-3, batch_size=64, seed=0)  # the user's own training, elsewhere
    torch.save(model.state_dict(), tmp_path / "trained.pt")
    expected = accuracy(model, data.val)
    workdir = workdir_with(tmp_path, """
        name: weights
        task:
          dataset_args: {image_size: 8}
          model: user_tasks:small_cnn
          weights: trained.pt
          train: {epochs: 0}
        space:
          pruning: {granularity: [channel], ratio: {low: 0.2, high: 0.5}}
          quantization: {bits: [8, 4]}
          lowrank:
    """)
    baseline, trial, folder = search_and_export(workdir, "weights")
    assert baseline["accuracy"] == pytest.approx(expected, abs=1e-12)  # the model as given, not retrained
    val = data.val
    feeds = [{"input": val[i][0][None].numpy()} for i in range(len(val))]
    labels = np.array([int(val[i][1]) for i in range(len(val))])
    assert float((onnx_logits(folder, feeds).argmax(1) == labels).mean()) == pytest.approx(trial["onnx_accuracy"], abs=1e-9)


def test_a_text_classifier_over_token_ids_fed_dict_batches_and_scored_by_f1_macro(tmp_path):
    workdir = workdir_with(tmp_path, """
        name: text
        task:
          dataset: user_tasks:sentences
          model: user_tasks:text_classifier
          collate: user_tasks:pad
          metric: f1_macro
          train: {epochs: 8, lr: 0.003, optimizer: adamw, weight_decay: 0.01, schedule: cosine, warmup_epochs: 1, grad_clip: 1.0}
        space:
          pruning: {granularity: [weight], ratio: {low: 0.3, high: 0.6}}
          quantization: {bits: [8, 4]}
          distillation:
    """)
    baseline, trial, folder = search_and_export(workdir, "text")
    assert {"f1_macro", "test_f1_macro", "f1_macro_ci_low", "onnx_f1_macro"} <= trial.keys() and "accuracy" not in trial
    assert baseline["f1_macro"] > 0.8  # it learned the markers
    sys.path.insert(0, str(workdir))
    try:
        from user_tasks import pad, sentences
    finally:
        sys.path.remove(str(workdir))
    from sklearn.metrics import f1_score

    val = sentences()[1]
    batches = [pad([val[i]]) for i in range(len(val))]
    feeds = [{"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()} for b in batches]
    predictions = onnx_logits(folder, feeds).argmax(1)
    assert f1_score([b["labels"].item() for b in batches], predictions, average="macro") == pytest.approx(trial["onnx_f1_macro"], abs=1e-9)
    card = (folder / "MODEL_CARD.md").read_text()
    assert "dtype=np.int64" in card and '"input_ids": input_ids' in card and "f1_macro" in card


@pytest.mark.slow  # 41 s; the default run keeps dict batches (the text classifier), which go through the same paths
def test_a_model_with_two_tensor_inputs(tmp_path):
    workdir = workdir_with(tmp_path, """
        name: two
        task:
          dataset: user_tasks:two_inputs
          model: user_tasks:two_input_net
          train: {epochs: 3}
        space:
          pruning: {granularity: [channel, weight], ratio: {low: 0.2, high: 0.5}}
          clustering: {clusters: [16]}
    """)
    _, trial, folder = search_and_export(workdir, "two")
    import onnx

    assert [i.name for i in onnx.load(str(folder / "model.onnx")).graph.input] == ["input_0", "input_1"]
    from netshrink.tasks.datasets import digits

    val = digits(image_size=8).val
    feeds = [{"input_0": val[i][0][None].numpy(), "input_1": val[i][0].sum(dim=-1).flatten()[None].numpy()} for i in range(len(val))]
    labels = np.array([int(val[i][1]) for i in range(len(val))])
    assert float((onnx_logits(folder, feeds).argmax(1) == labels).mean()) == pytest.approx(trial["onnx_accuracy"], abs=1e-9)


@pytest.mark.slow  # 60 s; a user metric (f1_macro, by name) stays in the text classifier's test
def test_a_user_loss_and_a_user_metric(tmp_path):
    workdir = workdir_with(tmp_path, """
        name: own
        task:
          dataset_args: {image_size: 8}
          model: user_tasks:small_cnn
          loss: user_tasks:smoothed_cross_entropy
          metric: user_tasks:balanced_accuracy
          train: {epochs: 3, optimizer: sgd, lr: 0.05, momentum: 0.9}
        max_metric_drop: 0.1
        space:
          quantization: {bits: [8, 4]}
          pruning: {granularity: [weight], ratio: {low: 0.2, high: 0.5}}
    """)
    result = netshrink("validate", "exp.yaml", cwd=workdir)
    assert result.returncode == 0, result.stderr
    baseline, trial, folder = search_and_export(workdir, "own")
    assert {"balanced_accuracy", "test_balanced_accuracy", "balanced_accuracy_ci_high"} <= trial.keys()
    assert baseline["balanced_accuracy_ci_low"] < baseline["balanced_accuracy"] < baseline["balanced_accuracy_ci_high"]  # bootstrap
    assert "balanced_accuracy" in (folder / "MODEL_CARD.md").read_text()
