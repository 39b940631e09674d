"""Bad input of a user's own task fails at validation, in seconds, naming the field and the rule, all problems at once."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from netshrink.errors import UserError
from netshrink.validation import load_experiment

USERLAND = Path(__file__).parent / "search" / "userland" / "user_tasks.py"


def experiment(tmp_path: Path, text: str) -> Path:
    shutil.copy(USERLAND, tmp_path / "user_tasks.py")
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text) + "space: {quantization: {bits: [8]}}\n")
    return path


def problems(path: Path) -> str:
    with pytest.raises(UserError) as raised:
        load_experiment(path)
    return str(raised.value)


def test_weights_loss_and_metric_problems_are_reported_in_one_run(tmp_path):
    torch.save({"conv1.weight": torch.zeros(16, 1, 5, 5)}, tmp_path / "other.pt")
    text = problems(experiment(tmp_path, """
        name: x
        task:
          dataset_args: {image_size: 8}
          model: user_tasks:small_cnn
          weights: other.pt
          loss: user_tasks:unreduced_loss
          metric: user_tasks:nan_metric
    """))
    assert "task.weights:" in text and "'conv1.bias' is missing" in text
    assert "task.loss:" in text and "scalar tensor" in text and "shape (2,)" in text
    assert "task.metric 'nan_metric' returned nan" in text


def test_weights_of_the_wrong_shape_name_the_layer_and_both_shapes(tmp_path):
    sys.path.insert(0, str(USERLAND.parent))
    try:
        from user_tasks import small_cnn
    finally:
        sys.path.remove(str(USERLAND.parent))
    state = small_cnn().state_dict()
    state["fc.weight"] = torch.zeros(10, 64)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "wrong.safetensors")
    text = problems(experiment(tmp_path, "name: x\ntask: {dataset_args: {image_size: 8}, model: 'user_tasks:small_cnn', weights: wrong.safetensors}\n"))
    assert "task.weights:" in text and "'fc.weight' has shape (10, 64) in the file and (10, 128) in the model" in text


def test_a_label_key_that_is_not_in_the_batch(tmp_path):
    text = problems(experiment(tmp_path, """
        name: x
        task: {dataset: 'user_tasks:sentences', model: 'user_tasks:text_classifier', collate: 'user_tasks:pad', label_key: target}
    """))
    assert "task.label_key: 'target' is not a key of the batch; its keys: ['input_ids', 'attention_mask', 'labels']" in text


def test_a_batch_the_model_cannot_take_names_the_inputs(tmp_path):
    text = problems(experiment(tmp_path, "name: x\ntask: {dataset: 'user_tasks:two_inputs', model: 'user_tasks:small_cnn'}\n"))
    assert "task.model: model 'user_tasks:small_cnn' does not run on a batch of 'user_tasks:two_inputs'" in text
    assert "input_0: float32 (2, 1, 8, 8), input_1: float32 (2, 8)" in text


def test_a_model_that_returns_no_logits(tmp_path):
    (tmp_path / "odd.py").write_text(
        "import torch\n\nclass Odd(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n        return {'scores': self.fc(x.flatten(1))}\n"
    )
    text = problems(experiment(tmp_path, "name: x\ntask: {dataset_args: {image_size: 8}, model: 'odd:Odd'}\n"))
    assert "task.model: the model returned a dict with keys ['scores'], but no 'logits' tensor" in text


def test_mixed_precision_needs_a_gpu_and_cuda(tmp_path):
    with pytest.raises(UserError, match=r"finetune.precision: bf16 is mixed precision on CUDA, and resources.gpu is 0"):
        load_experiment(experiment(tmp_path, "name: x\nfinetune: {precision: bf16}\n"))
    if not torch.cuda.is_available():
        text = problems(experiment(tmp_path, "name: x\nresources: {gpu: 1}\ntask: {train: {precision: fp16}}\n"))
        assert "task.train.precision: fp16 is mixed precision on CUDA, and torch" in text and "sees no CUDA device" in text


def test_min_accuracy_is_the_old_name_of_min_metric(tmp_path):
    assert load_experiment(experiment(tmp_path, "name: x\nmin_accuracy: 0.9\n")).min_metric == 0.9
    with pytest.raises(UserError, match="min_accuracy: this task's metric is 'f1_macro', not accuracy; use min_metric"):
        load_experiment(experiment(tmp_path, "name: x\ntask: {metric: f1_macro}\nmin_accuracy: 0.9\n"))
    with pytest.raises(UserError, match=r"objectives: unknown objective\(s\) \['accuracy'\] \(this task's metric is 'f1_macro'"):
        load_experiment(experiment(tmp_path, "name: x\ntask: {metric: f1_macro}\nobjectives: [accuracy, size_bytes]\n"))


def test_a_baseline_that_learned_nothing_stops_the_search_naming_both_figures(tmp_path):
    path = experiment(tmp_path, "name: weak\ntask: {dataset_args: {image_size: 16}, train: {epochs: 0}}\nsearch: {trials: 1}\n")
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "search", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "always answering the most frequent class scores" in result.stderr and "task.allow_weak_baseline" in result.stderr
    assert "Traceback" not in result.stderr and "[1/1]" not in result.stdout


def test_samples_of_different_lengths_without_a_collate_say_what_to_give(tmp_path):
    text = problems(experiment(tmp_path, "name: x\ntask: {dataset: 'user_tasks:sentences', model: 'user_tasks:text_classifier'}\n"))
    assert "task.dataset:" in text and "stack expects each tensor to be equal size" in text and "(task.collate)" in text
