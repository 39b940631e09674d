"""A search on each family users ship, on the real stack: every technique that applies to the model, a few
trials, and none may fail. The Hugging Face models are trained in the test (the baseline, on a small learnable task)
and fed dict batches; the CNNs are narrow copies of torchvision's ResNet-18 and MobileNetV2 layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytest.importorskip("transformers")

HERE = Path(__file__).parent
FAMILIES = {
    "bert": ("family_tasks:sentences", "family_tasks:bert", "{vocab_size: 64, hidden_size: 32, max_length: 16}", "{epochs: 20, lr: 0.003}", "text"),
    "vit": ("family_tasks:pixels", "family_tasks:vit", "{image_size: 16, patch_size: 4, hidden_size: 32}", "{epochs: 15, lr: 0.002}", "text"),
    "resnet18": ("family_tasks:images", "family_tasks:resnet18", "{width: 8}", "{epochs: 4, lr: 0.003}", "image"),
    "mobilenet_v2": ("family_tasks:images", "family_tasks:mobilenet_v2", "{width_mult: 0.25}", "{epochs: 6, lr: 0.003}", "image"),
}
SPACES = {
    "image": "separable:\n  lowrank:\n  early_exit:\n  distillation:\n  pruning:\n  quantization:\n  clustering:\n",
    "text": "lowrank:\n  early_exit:\n  distillation:\n  pruning: {granularity: [channel, weight], head_ratio: {low: 0.0, high: 0.5}}\n  quantization:\n  clustering:\n",
}


@pytest.mark.parametrize(
    "family", [pytest.param("bert", marks=pytest.mark.slow), pytest.param("vit", marks=pytest.mark.slow), pytest.param("resnet18", marks=pytest.mark.slow), pytest.param("mobilenet_v2", marks=pytest.mark.slow)]
)
def test_a_search_on_each_family_has_no_failed_trial(family, tmp_path):
    dataset, model, model_args, train, space = FAMILIES[family]
    shutil.copy(HERE / "userland" / "family_tasks.py", tmp_path)
    shutil.copy(HERE.parent / "families.py", tmp_path)
    (tmp_path / "exp.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: {family}
            task: {{dataset: "{dataset}", model: "{model}", model_args: {model_args}, train: {train}}}
            finetune: {{epochs: 1}}
            objectives: [accuracy, onnx_bytes, latency_ms]   # who ships model.onnx optimises its size
            measure: {{warmup: 10, repeats: 50}}
            search: {{trials: 4, max_concurrent: 2, sampler: random, seed: 3, informed_start: false, early_stopping: false}}
            """
        )
        + "space:\n  " + SPACES[space]
    )
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "search", "exp.yaml"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "(0 failed)" in result.stdout, result.stdout[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(family).experiment_id])
    parent = next(run for run in runs if run.data.tags.get("netshrink.role") == "search")
    trials = [run for run in runs if run.data.tags.get("netshrink.role") == "trial"]
    assert len(trials) == 4 and all(run.info.status == "FINISHED" for run in trials)
    assert "model.onnx" in result.stdout and all(run.data.metrics["onnx_bytes"] > 0 for run in trials)
    assert json.loads(parent.data.tags["objectives"])[1] == "onnx_bytes"
    # the baseline learned its task (chance: 0.25 for the sentences, 0.1 for the digits)
    assert parent.data.metrics["baseline_accuracy"] > (0.9 if family == "bert" else 0.6)
