"""Multi-fidelity inside a trial: the model measured in full at each rung, training going on from where it stands."""

import pytest
import torch

from netshrink.config import FinetuneSettings, MeasureSettings, TaskConfig
from netshrink.deploy import evaluate
from netshrink.tasks import build_model, load_data
from netshrink.techniques import Pipeline, PruningConfig, QuantizationConfig, save_artifact
from netshrink.training import train

RECIPE = Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5), QuantizationConfig(bits=4)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = TaskConfig()
    data = load_data(task.dataset, task.dataset_args)
    torch.manual_seed(0)
    model = build_model(task.model, task.model_args, data)
    train(model, data.train, epochs=3, lr=1e-3, batch_size=64, seed=0)
    baseline = tmp_path_factory.mktemp("baseline") / "baseline.safetensors"
    save_artifact(baseline, model, {}, Pipeline().recipe())
    return evaluate.RecipeSetup(
        task=task, finetune=FinetuneSettings(epochs=3), measure=MeasureSettings(warmup=5, repeats=50), seed=0, cpus=1, search_path=".",
        baseline_weights=baseline.read_bytes(), baseline_metrics={"accuracy": 0.9, "size_bytes": float(baseline.stat().st_size), "latency_ms": 0.1},
    )


def test_a_promoted_trial_goes_on_from_its_rung_and_ends_where_one_without_rungs_ends(setup, tmp_path):
    from dataclasses import replace

    (tmp_path / "plain").mkdir()
    plain = evaluate.evaluate_recipe(setup, RECIPE, tmp_path / "plain")
    seen = []
    laddered = evaluate.evaluate_recipe(replace(setup, rungs=(1, 3)), RECIPE, tmp_path, at_rung=lambda metrics: seen.append(metrics) or True)
    assert [m[evaluate.RUNG_METRIC] for m in seen] == [1.0] and laddered[evaluate.RUNG_METRIC] == 3.0 and laddered["rung_of"] == 2.0
    rung = seen[0]
    assert {"accuracy", "test_accuracy", "onnx_accuracy", "size_bytes", "onnx_bytes", "latency_ms"} <= rung.keys()  # measured in full at the rung
    assert rung["size_bytes"] == laddered["size_bytes"]  # the same compressed structure at every rung
    assert rung["latency_ms"] == laddered["latency_ms"] and laddered["latency_rung_epochs"] == 1.0  # timed once, at the first rung
    # the fine-tuning clock: pure fine-tuning, the compression and the rung's measurement left out
    assert 0 < rung[evaluate.FINE_TUNING_METRIC] < laddered[evaluate.FINE_TUNING_METRIC] < laddered["seconds_training"]
    assert laddered[evaluate.FINE_TUNING_METRIC] < laddered["seconds_training"] - rung["seconds_latency"] - rung["seconds_evaluation"]
    # measuring at the rung neither retrains nor perturbs training: the model after 3 epochs is the one without rungs
    assert laddered["accuracy"] == plain["accuracy"] and laddered["test_accuracy"] == plain["test_accuracy"]
    assert (tmp_path / evaluate.ARTIFACT_FILE).is_file()


def test_a_trial_stopped_at_its_rung_ends_with_the_rungs_measurement(setup, tmp_path):
    from dataclasses import replace

    ended = evaluate.evaluate_recipe(replace(setup, rungs=(1, 3)), RECIPE, tmp_path, at_rung=lambda metrics: False)
    assert ended[evaluate.RUNG_METRIC] == 1.0 and ended["rung_index"] == 1.0 and "accuracy" in ended and evaluate.STOPPED not in ended
    assert ended["seconds_training"] > 0
