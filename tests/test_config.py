import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netshrink.config import Experiment
from netshrink.validation import load_experiment
from netshrink.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "spaces" / "digits.yaml"


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_worked_example_is_valid():
    experiment = load_experiment(EXAMPLE)
    assert experiment.task.model == "lenet5" and experiment.task.dataset == "digits"
    assert experiment.objectives == ["accuracy", "size_bytes", "latency_ms"]
    assert experiment.directions() == ["max", "min", "min"]
    assert list(experiment.space.techniques()) == ["separable", "lowrank", "early_exit", "slimmable", "distillation", "pruning", "quantization", "clustering"]


def test_minimal_file_gets_sensible_defaults(tmp_path):
    experiment = load_experiment(write(tmp_path, "name: mini\nspace:\n  pruning:\n"))
    assert experiment.search.sampler == "tpe" and experiment.search.trial_budget == 32 and experiment.search.multi_fidelity.enabled == "auto"
    assert experiment.tracking_uri is None
    assert experiment.resources.cpu == 1 and experiment.resources.gpu == 0


def test_every_problem_is_reported_at_once_with_its_field(tmp_path):
    path = write(
        tmp_path,
        """
        name: ok
        task:
          train: {epochs: -1, lrr: 0.1}
        search: {sampler: bayes, trials: -1}
        resources: {gpu: -0.5}
        objectives: [accuracy, flops]
        space:
          pruning: {ratio: {low: 0.5, high: 1.5}}
        """,
    )
    with pytest.raises(UserError) as caught:
        load_experiment(path)
    text = caught.value.render()
    for fragment in (
        "task.train.epochs: Input should be greater than or equal to 0",
        "task.train.lrr: unknown key",
        "search.sampler: Input should be 'tpe', 'nsga2', 'gp', 'botorch' or 'random' (got 'bayes')",
        "search.trials:",
        "resources.gpu:",
        "objectives: unknown objective(s) ['flops']",
        "space.pruning.ratio: high 1.5: Input should be less than 1",
    ):
        assert fragment in text, text


def test_missing_name_and_space(tmp_path):
    with pytest.raises(UserError) as caught:
        load_experiment(write(tmp_path, "task: {}\n"))
    assert "name: required key is missing" in caught.value.render()
    assert "space: required key is missing" in caught.value.render()


def test_empty_space_is_refused(tmp_path):
    with pytest.raises(UserError, match="lists no technique"):
        load_experiment(write(tmp_path, "name: x\nspace: {}\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_experiment(write(tmp_path, "name: [unclosed\n"))


def test_user_factories_are_imported_before_anything_runs(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\ndef make(num_classes):\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))\n"
    )
    good = write(tmp_path, "name: x\ntask: {model: 'mymodels:make', dataset_args: {image_size: 8}}\nspace: {pruning: }\n")
    assert load_experiment(good).task.model == "mymodels:make"
    bad_attr = write(tmp_path, "name: x\ntask: {model: 'mymodels:nothing'}\nspace: {pruning: }\n", "b.yaml")
    with pytest.raises(UserError, match="task.model: module 'mymodels' has no attribute 'nothing'"):
        load_experiment(bad_attr)
    bad_module = write(tmp_path, "name: x\ntask: {dataset: 'no_such_module_xyz:data'}\nspace: {pruning: }\n", "c.yaml")
    with pytest.raises(UserError, match="task.dataset: cannot import module 'no_such_module_xyz'"):
        load_experiment(bad_module)
    bad_builtin = write(tmp_path, "name: x\ntask: {model: resnet50}\nspace: {pruning: }\n", "d.yaml")
    with pytest.raises(UserError, match="neither a built-in"):
        load_experiment(bad_builtin)


def test_a_model_that_does_not_fit_the_data_is_reported_before_running(tmp_path):
    with pytest.raises(UserError, match=r"task.model: building model 'lenet5' failed: ValueError: lenet5 needs images of at least 16x16"):
        load_experiment(write(tmp_path, "name: x\ntask: {dataset_args: {image_size: 8}}\nspace: {pruning: }\n"))
    with pytest.raises(UserError, match="task.dataset_args: building dataset 'digits' failed: TypeError"):
        load_experiment(write(tmp_path, "name: x\ntask: {dataset_args: {colour: true}}\nspace: {pruning: }\n", "e.yaml"))


def test_cli_reports_bad_input_with_exit_code_2_and_no_traceback(tmp_path):
    path = write(tmp_path, "name: x\nspace:\n  pruning: {ratio: 2}\n")
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "search", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "space.pruning.ratio" in result.stderr and "less than 1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / ".netshrink").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


def test_cli_missing_file_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "search", "missing.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_cli_help_explains_every_subcommand():
    for command in ([], ["search"], ["front"], ["validate"]):
        result = subprocess.run([sys.executable, "-m", "netshrink.cli", *command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout
    search_help = subprocess.run([sys.executable, "-m", "netshrink.cli", "search", "--help"], capture_output=True, text=True).stdout
    for flag in ("--trials", "--concurrency", "--address", "--tracking-uri"):
        assert flag in search_help


def test_an_early_exit_placement_that_is_not_a_cut_point_fails_before_any_work(tmp_path):
    text = EXAMPLE.read_text().replace('after: [pool2, pool1, "pool1+pool2"]', 'after: [pool1, "pool2+pool7"]')
    (tmp_path / "exp.yaml").write_text(text)
    with pytest.raises(UserError, match=r"space.early_exit.after: 'pool7' is not a cut point of model 'lenet5'; its cut points, in forward order: conv1, pool1"):
        load_experiment(tmp_path / "exp.yaml")


def test_a_key_written_twice_is_an_error_naming_the_key_and_its_lines(tmp_path):
    path = write(
        tmp_path,
        """\
        name: twice
        space:
          pruning: {ratio: 0.5}
          quantization: {bits: [8]}
          pruning: {ratio: 0.9}
        search: {trials: 3, trials: 4}
        """,
    )
    with pytest.raises(UserError) as caught:
        load_experiment(path)
    text = caught.value.render()
    assert "space.pruning: key written 2 times, on lines 3, 5" in text
    assert "search.trials: key written 2 times, on lines 6, 6" in text
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "validate", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "space.pruning: key written 2 times" in result.stderr and "Traceback" not in result.stderr


def test_a_merge_key_may_override_what_it_merges(tmp_path):
    path = write(tmp_path, "name: merged\nfast: &fast {epochs: 1, lr: 0.001}\nspace: {pruning: }\n", "base.yaml")
    text = path.read_text().replace("fast: &fast {epochs: 1, lr: 0.001}\n", "") + "finetune:\n  <<: {epochs: 1, lr: 0.001}\n  epochs: 2\n"
    path.write_text(text)
    assert load_experiment(path).finetune.epochs == 2


def test_a_factory_from_the_standard_library_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path, f"name: x\ntask: {{dataset: 'os:system', dataset_args: {{command: 'touch {marker}'}}}}\nspace: {{pruning: }}\n")
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "validate", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "task.dataset: 'os:system': a 'module:factory' reference must name your own code" in result.stderr
    assert not marker.exists()
    # the same function reached through a module of the user's
    (tmp_path / "reexports.py").write_text("from os import system\nfrom subprocess import run\n")
    for factory in ("system", "run"):
        with pytest.raises(UserError, match=f"'reexports:{factory}': a 'module:factory' reference must name your own code.*Python's own"):
            load_experiment(write(tmp_path, f"name: x\ntask: {{model: 'reexports:{factory}'}}\nspace: {{pruning: }}\n", f"{factory}.yaml"))
    assert not marker.exists()


EXPORT_TROUBLE = """
import torch
from torch import nn


class Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x.flatten(1)) * torch.linalg.svdvals(x[:, 0]).sum(1, keepdim=True)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        y = self.linear(x.flatten(1))
        return y if x.sum() > 0 else -y


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.encoder(self.embed(x.reshape(x.shape[0], 8, 8)))
        tokens, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(tokens.mean(1))
"""


@pytest.mark.parametrize(
    "model, expected",
    [
        ("Spectral", "operator 'aten::linalg_svdvals' has no ONNX equivalent"),
        ("Branchy", "computes other outputs than in torch"),
    ],
)
def test_a_model_onnx_cannot_carry_fails_validation_in_seconds(tmp_path, model, expected):
    module = f"trouble_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(EXPORT_TROUBLE)
    path = write(tmp_path, f"name: x\ntask: {{model: '{module}:{model}', dataset_args: {{image_size: 8}}}}\nspace: {{pruning: }}\n")
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "search", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"task.model: model '{module}:{model}': " in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr and "Torch IR graph" not in result.stdout + result.stderr
    assert not (tmp_path / ".netshrink").exists()  # no baseline trained, no Ray started


def test_pytorchs_own_transformer_layers_pass_the_export_check(tmp_path):
    module = f"trouble_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(EXPORT_TROUBLE)
    path = write(tmp_path, f"name: x\ntask: {{model: '{module}:Encoder', dataset_args: {{image_size: 8}}}}\nspace: {{quantization: }}\n")
    assert load_experiment(path).task.model == f"{module}:Encoder"
