"""Bad input of a user's own task fails at validation, in seconds, naming the field and the rule, all problems at once."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from netshrink import validation
from netshrink.errors import UserError
from netshrink.validation import Progress, load_experiment

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


def test_validate_prints_each_phase_as_it_starts_and_its_time_when_it_ends(tmp_path):
    from typer.testing import CliRunner

    from netshrink.cli import app

    path = experiment(tmp_path, "name: x\ntask: {dataset_args: {image_size: 8}, model: 'user_tasks:small_cnn'}\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    phases = re.findall(r"^  (.+) \.\.\. done in \d+\.\d s$", result.output, flags=re.MULTILINE)
    assert phases == [
        "building the dataset (digits)", "building the model (user_tasks:small_cnn)", "running one batch through the model, the loss and the metric",
        "exporting to ONNX and comparing ONNX Runtime with torch", "probing the space on the model",
    ], result.output
    assert len(result.output.splitlines()) <= 8, result.output


def test_a_phase_that_runs_long_says_so_while_it_runs_and_its_notices_stop_with_it(monkeypatch):
    monkeypatch.setattr(validation, "STILL_RUNNING_FIRST_S", 0.1)
    monkeypatch.setattr(validation, "STILL_RUNNING_EVERY_S", 0.1)
    lines: list[str] = []
    progress, before = Progress(lambda text, end="\n": lines.append(text + end)), threading.active_count()
    with progress.phase("building the model", "slow:make"):
        time.sleep(0.35)
    assert threading.active_count() == before
    text = "".join(lines)
    assert text.startswith("  building the model (slow:make) ...\n  still building the model after 0 s ...\n"), text
    assert re.search(r"\n  building the model: done in 0\.\d s\n$", text), text
    with pytest.raises(KeyboardInterrupt, match=r"^while building the dataset, after 0\.\d s$"):
        with Progress(None).phase("building the dataset"):
            raise KeyboardInterrupt


def test_ctrl_c_in_a_factory_that_hangs_says_where_it_was_and_exits_130(tmp_path):
    (tmp_path / "hang.py").write_text("def make(**kw):\n    import time\n    time.sleep(600)\n")
    path = experiment(tmp_path, "name: x\ntask: {dataset_args: {image_size: 8}, model: 'hang:make'}\n")
    driver = subprocess.Popen(
        [sys.executable, "-m", "netshrink.cli", "validate", str(path)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # Ctrl-C in a terminal: SIGINT to the process group, its default handler restored (a CI job's background process inherits it ignored)
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen, deadline = b"", time.monotonic() + 30
    try:
        while b"  building the model (hang:make) ..." not in seen:  # the phase line, before the factory returns (it never does)
            assert driver.poll() is None and time.monotonic() < deadline, seen.decode()
            if select.select([driver.stdout], [], [], 0.5)[0]:
                seen += os.read(driver.stdout.fileno(), 4096)
        os.killpg(driver.pid, signal.SIGINT)
        _, err = driver.communicate(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 130, err
    assert re.fullmatch(r"interrupted \(while building the model, after \d+\.\d s\)\n", err.decode()), err.decode()
