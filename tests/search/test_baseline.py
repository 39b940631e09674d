import os
import sys
import textwrap

import pytest
import torch

from netshrink.config import Experiment
from netshrink.tasks.task import load_task
from netshrink.search.baseline import FINGERPRINT_FILE, baseline_fingerprint, baseline_key, prepare_baseline
from netshrink.integrity import file_sha256
from netshrink.tasks import load_data
from netshrink.techniques import Pipeline, PruningConfig, compress, load_artifact, save_artifact

FAST = {"measure": {"warmup": 1, "repeats": 10}, "space": {"pruning": {}}}


def experiment(task: dict, name: str = "b") -> Experiment:
    return Experiment.model_validate({"name": name, "task": {"train": {"epochs": 1}, **task}, **FAST})


def test_baseline_is_trained_once_per_task_and_reused(tmp_path):
    first_experiment = experiment({"dataset_args": {"image_size": 16}})
    logs = []
    first = prepare_baseline(first_experiment, tmp_path, str(tmp_path), log=logs.append)
    stamp = first.artifact.stat().st_mtime_ns
    second = prepare_baseline(first_experiment.model_copy(update={"name": "other"}), tmp_path, str(tmp_path), log=logs.append)
    assert first.trained_now and not second.trained_now
    assert second.artifact == first.artifact and second.artifact.stat().st_mtime_ns == stamp
    assert second.metrics["accuracy"] == first.metrics["accuracy"]
    assert first.metrics["size_bytes"] == first.artifact.stat().st_size
    assert first.metrics["val_samples"] == first.metrics["test_samples"] == 360 // 4 * 4  # 20% each of 1,797 digits
    assert "Training the baseline" in logs[0] and "cached baseline" in logs[2]  # logs[1]: measuring the first
    assert (first.artifact.parent / FINGERPRINT_FILE).is_file()
    assert prepare_baseline(experiment({"dataset_args": {"image_size": 16}, "train": {"epochs": 2}}), tmp_path, str(tmp_path), log=logs.append).trained_now


def test_the_key_covers_the_task_section_the_versions_and_nothing_else():
    task = lambda **changes: load_task(experiment({"dataset_args": {"image_size": 16}, **changes}).task, ".")  # noqa: E731
    a, b, c = baseline_fingerprint(task()), baseline_fingerprint(task()), baseline_fingerprint(task(train={"epochs": 2}))
    assert baseline_key(a) == baseline_key(b) != baseline_key(c)
    assert a["torch"] == torch.__version__ and a["netshrink"]
    assert set(a["model_source"]) == {"netshrink.tasks.models"} and set(a["dataset_source"]) == {"netshrink.tasks.datasets"}
    assert baseline_key({**a, "torch": "0.0"}) != baseline_key(a) != baseline_key({**a, "netshrink": "0.0"})


USER_MODEL = """
from torch import nn

HIDDEN = {hidden}


def make(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1] * input_shape[-2], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes))
"""

USER_DATA = """
import numpy as np
import torch
from torch.utils.data import TensorDataset

from netshrink.tasks import TaskData


def make():
    images = torch.tensor(np.load(__file__.replace("userdata_{tag}.py", "images_{tag}.npy")))
    labels = torch.arange(len(images)) % 10
    split = lambda part: TensorDataset(images[part::3], labels[part::3])
    return TaskData(train=split(0), val=split(1), test=split(2), num_classes=10, input_shape=tuple(images.shape[1:]))
"""


def write_module(folder, name: str, text: str) -> None:
    """(Re)write a user module so that the next import reads it anew, as a new netshrink process would."""
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    stamp = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(stamp, stamp))  # an edit within a second of the last one must not look unchanged to the import system
    sys.modules.pop(name, None)


def test_edited_model_code_trains_a_new_baseline_and_says_why(tmp_path):
    module = f"usermodel_{tmp_path.name}"
    write_module(tmp_path, module, USER_MODEL.format(hidden=50))
    user = experiment({"model": f"{module}:make", "dataset_args": {"image_size": 8}})
    logs = []
    first = prepare_baseline(user, tmp_path / "cache", str(tmp_path), log=logs.append)
    assert first.trained_now and not prepare_baseline(user, tmp_path / "cache", str(tmp_path), log=logs.append).trained_now
    write_module(tmp_path, module, USER_MODEL.format(hidden=30))  # fc1 50 -> 30 units; the task section is the same
    second = prepare_baseline(user, tmp_path / "cache", str(tmp_path), log=logs.append)
    assert second.trained_now and second.artifact != first.artifact
    assert "model_source changed" in logs[-2]  # logs[-1]: measuring it
    assert second.metrics["parameters"] < first.metrics["parameters"]


def test_changed_data_with_the_same_arguments_trains_a_new_baseline(tmp_path):
    import numpy as np

    tag = tmp_path.name
    module = f"userdata_{tag}"
    write_module(tmp_path, module, USER_DATA.replace("{tag}", tag))
    rng = np.random.default_rng(0)
    np.save(tmp_path / f"images_{tag}.npy", rng.standard_normal((90, 1, 16, 16)).astype(np.float32))
    user = experiment({"dataset": f"{module}:make", "model": "lenet5"})
    logs = []
    first = prepare_baseline(user, tmp_path / "cache", str(tmp_path), log=logs.append)
    assert not prepare_baseline(user, tmp_path / "cache", str(tmp_path), log=logs.append).trained_now
    images = np.load(tmp_path / f"images_{tag}.npy")
    images[-1, 0, 0, 0] += 1.0  # one pixel of one test image
    np.save(tmp_path / f"images_{tag}.npy", images)
    second = prepare_baseline(user, tmp_path / "cache", str(tmp_path), log=logs.append)
    assert second.trained_now and second.artifact != first.artifact
    assert "data changed" in logs[-2]  # logs[-1]: measuring it


def test_an_artifact_whose_shapes_the_model_no_longer_has_is_refused_naming_the_layer(tmp_path):
    def mlp(hidden: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

    save_artifact(tmp_path / "plain.safetensors", mlp(50), {}, Pipeline().recipe())
    with pytest.raises(ValueError, match=r"1\.weight: \(50, 64\) stored, \(30, 64\) built.*no step of the artifact's recipe changes shapes"):
        load_artifact(tmp_path / "plain.safetensors", mlp(30))
    # a recipe that removes channels stores narrower layers than the factory builds: that loads
    pruned = compress(mlp(50), Pipeline(steps=[PruningConfig(granularity="channel", ratio=0.5)]), torch.zeros(1, 1, 8, 8))
    save_artifact(tmp_path / "pruned.safetensors", pruned.model, pruned.encodings, pruned.pipeline.recipe())
    assert load_artifact(tmp_path / "pruned.safetensors", mlp(50)).model[1].weight.shape[0] < 50


def test_the_key_covers_the_weights_file_and_epochs_0_measures_the_model_as_given(tmp_path):
    from netshrink.tasks import build_model, load_data
    from netshrink.training import accuracy

    data = load_data("digits", {"image_size": 16})
    torch.manual_seed(5)
    model = build_model("lenet5", {}, data)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    given = experiment({"dataset_args": {"image_size": 16}, "weights": "w.pt", "train": {"epochs": 0}, "allow_weak_baseline": True})
    key = baseline_key(baseline_fingerprint(load_task(given.task, str(tmp_path))))
    baseline = prepare_baseline(given, tmp_path / "cache", str(tmp_path), log=lambda line: None)
    assert baseline.metrics["accuracy"] == accuracy(model, data.val)  # not trained: the weights as given
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    assert baseline_key(baseline_fingerprint(load_task(given.task, str(tmp_path)))) != key


def damaged(path, how: str) -> None:
    """``zeroed``: the weights' bytes zeroed, the size and the safetensors header kept (the file still parses);
    ``truncated``: cut in half (it does not)."""
    data = path.read_bytes()
    if how == "zeroed":
        start = 8 + int.from_bytes(data[:8], "little")  # safetensors: header length, header, then the tensors' bytes
        path.write_bytes(data[:start] + bytes(len(data) - start))
    else:
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["zeroed", "truncated"])
def test_a_damaged_cached_baseline_is_trained_again_and_the_log_says_why(tmp_path, how):
    task = experiment({"dataset_args": {"image_size": 16}})
    first = prepare_baseline(task, tmp_path, str(tmp_path), log=lambda line: None)
    sound = first.artifact.read_bytes()
    assert (first.artifact.parent / "baseline.safetensors.sha256").read_text().split()[0] == file_sha256(first.artifact)
    damaged(first.artifact, how)
    logs = []
    again = prepare_baseline(task, tmp_path, str(tmp_path), log=logs.append)
    assert again.trained_now and "is damaged: its SHA-256 is" in logs[0] and str(first.artifact) in logs[0], logs
    assert again.weights == again.artifact.read_bytes() == sound  # the same seed trains the same model again
    assert again.metrics["accuracy"] == first.metrics["accuracy"]
    # a file with no recorded checksum (cut short before it was written) is not trusted either
    (first.artifact.parent / "baseline.safetensors.sha256").unlink()
    logs.clear()
    assert prepare_baseline(task, tmp_path, str(tmp_path), log=logs.append).trained_now and "no recorded SHA-256" in logs[0]
