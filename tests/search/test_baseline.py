from netshrink.config import Experiment
from netshrink.search.baseline import prepare_baseline


def test_baseline_is_trained_once_per_task_and_reused(tmp_path):
    experiment = Experiment.model_validate(
        {"name": "b", "task": {"dataset_args": {"image_size": 16}, "train": {"epochs": 1}}, "measure": {"warmup": 1, "repeats": 10}, "space": {"pruning": {}}}
    )
    logs = []
    first = prepare_baseline(experiment, tmp_path, str(tmp_path), log=logs.append)
    stamp = first.artifact.stat().st_mtime_ns
    second = prepare_baseline(experiment.model_copy(update={"name": "other"}), tmp_path, str(tmp_path), log=logs.append)
    assert first.trained_now and not second.trained_now
    assert second.artifact == first.artifact and second.artifact.stat().st_mtime_ns == stamp
    assert second.metrics["accuracy"] == first.metrics["accuracy"]
    assert first.metrics["size_bytes"] == first.artifact.stat().st_size
    assert "Training the baseline" in logs[0] and "cached baseline" in logs[1]
    retrain = experiment.model_copy(update={"task": experiment.task.model_copy(update={"train": experiment.task.train.model_copy(update={"epochs": 2})})})
    assert prepare_baseline(retrain, tmp_path, str(tmp_path), log=logs.append).trained_now
