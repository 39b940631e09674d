import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netshrink.config import Experiment, baseline_key, load_experiment
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
    assert list(experiment.space.techniques()) == ["separable", "lowrank", "early_exit", "distillation", "pruning", "quantization", "clustering"]


def test_minimal_file_gets_sensible_defaults(tmp_path):
    experiment = load_experiment(write(tmp_path, "name: mini\nspace:\n  pruning:\n"))
    assert experiment.search.sampler == "nsga2"
    assert experiment.tracking_uri is None
    assert experiment.resources.cpu == 1 and experiment.resources.gpu == 0


def test_every_problem_is_reported_at_once_with_its_field(tmp_path):
    path = write(
        tmp_path,
        """
        name: ok
        task:
          train: {epochs: 0, lrr: 0.1}
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
        "task.train.epochs: Input should be greater than or equal to 1",
        "task.train.lrr: unknown key",
        "search.sampler: Input should be 'nsga2', 'tpe' or 'random' (got 'bayes')",
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
    with pytest.raises(UserError, match=r"task.model: model 'lenet5' does not run on 'digits' inputs of shape \(1, 8, 8\).*16x16"):
        load_experiment(write(tmp_path, "name: x\ntask: {dataset_args: {image_size: 8}}\nspace: {pruning: }\n"))
    with pytest.raises(UserError, match="task.dataset_args: building dataset 'digits' failed: TypeError"):
        load_experiment(write(tmp_path, "name: x\ntask: {dataset_args: {colour: true}}\nspace: {pruning: }\n", "e.yaml"))


def test_baseline_key_depends_on_task_and_training_only():
    a = Experiment.model_validate({"name": "a", "space": {"pruning": {}}})
    b = Experiment.model_validate({"name": "b", "space": {"quantization": {}}, "search": {"trials": 3}})
    c = Experiment.model_validate({"name": "a", "space": {"pruning": {}}, "task": {"train": {"epochs": 2}}})
    assert baseline_key(a.task) == baseline_key(b.task) != baseline_key(c.task)


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
    text = EXAMPLE.read_text().replace('after: [pool1, pool2, "pool1+pool2"]', 'after: [pool1, "pool2+pool7"]')
    (tmp_path / "exp.yaml").write_text(text)
    with pytest.raises(UserError, match=r"space.early_exit.after: 'pool7' is not a cut point of model 'lenet5'; its cut points, in forward order: conv1, pool1"):
        load_experiment(tmp_path / "exp.yaml")
