"""Device choice for a trial, and that fine-tuning follows it while everything measured stays on the CPU.

Runs on a CPU-only torch: CUDA's presence is monkeypatched, and the trial path is
checked by recording which device ``train`` was given.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from netshrink.config import FinetuneSettings, MeasureSettings, TaskConfig
from netshrink.devices import trial_device
from netshrink.deploy import evaluate
from netshrink.techniques import Pipeline, PruningConfig, save_artifact
from netshrink.training import accuracy, on_device, train
from netshrink.tasks import build_model, load_data


@pytest.mark.parametrize("requested", [0.25, 1, 2])
def test_a_trial_that_reserved_gpus_uses_cuda_when_it_sees_one(monkeypatch, requested):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trial_device(requested) == torch.device("cuda")


@pytest.mark.parametrize("cuda", [True, False])
def test_a_trial_that_reserved_no_gpu_stays_on_the_cpu_even_beside_a_visible_one(monkeypatch, cuda):
    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for num_gpus=0: the card may be visible yet lent to others
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert trial_device(0) == torch.device("cpu")


@pytest.mark.parametrize("requested", [0.25, 1])
def test_gpus_requested_but_none_visible_falls_back_to_the_cpu_with_a_warning(monkeypatch, caplog, requested):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trial_device(requested) == torch.device("cpu")
    [record] = caplog.records
    assert record.levelname == "WARNING" and f"resources.gpu is {requested:g} but CUDA is not available" in record.message


def test_on_device_moves_the_model_there_and_back():
    moves = []

    class Recorded(nn.Linear):
        def to(self, *args, **kwargs):  # records the move, stays on the CPU (no CUDA here)
            moves.append(torch.device(args[0]))
            return self

    with on_device(Recorded(2, 2), "cuda"):
        assert moves == [torch.device("cuda")]
    assert moves == [torch.device("cuda"), torch.device("cpu")]


def test_train_and_accuracy_take_an_explicit_device_and_leave_the_model_on_the_cpu():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=generator)
    y = (x[:, 0] > 0).long()  # linearly separable: a working loop learns it in a few epochs
    data = TensorDataset(x, y)
    model = nn.Linear(4, 2)
    history = train(model, data, epochs=5, lr=5e-2, batch_size=16, seed=0, device=torch.device("cpu"))
    assert len(history) == 5 and all(math.isfinite(loss) for loss in history)
    assert history[-1] < history[0], history
    measured = accuracy(model, data, batch_size=48, device="cpu")  # 48 + 48 + 32: uneven batches must weigh by sample
    with torch.no_grad():
        by_hand = (model(x).argmax(dim=1) == y).float().mean().item()
    assert measured == pytest.approx(by_hand) and measured > 0.9
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_a_trial_fine_tunes_on_the_device_its_gpu_request_selects(monkeypatch, tmp_path):
    requests, devices = [], []
    chosen = torch.device("cpu", 0)  # a CPU that differs from train's default "cpu", so a dropped device shows

    def chosen_device(requested_gpus: float) -> torch.device:
        requests.append(requested_gpus)
        return chosen

    def recording_train(model, dataset, **kwargs):
        devices.append(kwargs["device"])
        return train(model, dataset, **kwargs)

    monkeypatch.setattr(evaluate, "trial_device", chosen_device)
    monkeypatch.setattr(evaluate, "train", recording_train)
    task = TaskConfig(dataset_args={"image_size": 16})
    data = load_data(task.dataset, task.dataset_args)
    baseline = tmp_path / "baseline.safetensors"
    save_artifact(baseline, build_model(task.model, task.model_args, data), {}, Pipeline().recipe())
    setup = evaluate.RecipeSetup(
        task=task,
        finetune=FinetuneSettings(epochs=1),
        measure=MeasureSettings(warmup=2, repeats=10),
        seed=0,
        cpus=1,
        search_path=str(tmp_path),
        baseline_weights=baseline.read_bytes(),
        baseline_metrics={"accuracy": 0.1, "size_bytes": float(baseline.stat().st_size), "latency_ms": 0.1},
        gpus=0.25,
    )
    workdir = tmp_path / "trial"
    workdir.mkdir()
    metrics = evaluate.evaluate_recipe(setup, Pipeline(steps=[PruningConfig(ratio=0.5, steps=2)]), workdir)
    assert requests == [0.25]
    assert devices == [chosen, chosen]  # both fine-tuning rounds of the two-step pruning
    assert (workdir / evaluate.ARTIFACT_FILE).is_file() and math.isfinite(metrics["accuracy"])
