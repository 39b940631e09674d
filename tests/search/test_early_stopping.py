"""A hopeless trial stopped for real, through Ray, Optuna and MLflow."""


def test_a_hopeless_trial_is_stopped_in_its_first_quarter_and_logged_as_such_in_mlflow_and_optuna(tmp_path):
    """Low-rank at 1% of the rank (fc1 through one dimension) leaves LeNet-5 far from usable: the trial is stopped, measured as it stood, and told
    to Optuna as complete but infeasible; the float16 trial runs to the end and is feasible."""
    import subprocess
    import sys
    import textwrap

    import optuna
    from mlflow.tracking import MlflowClient

    (tmp_path / "exp.yaml").write_text(
        textwrap.dedent(
            """
            name: stopping
            task: {dataset_args: {image_size: 16}, train: {epochs: 3}}
            finetune: {epochs: 1}
            search: {trials: 2, max_concurrent: 1, sampler: random}
            measure: {warmup: 5, repeats: 100}
            space:
              lowrank: {enabled: search, rank_fraction: 0.01}
              quantization: {enabled: true, allocation: uniform, bits: 16}
            """
        )
    )
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", "search", "exp.yaml"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped after 25% of fine-tuning" in result.stdout  # at the first checkpoint after the grace
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stopping").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["netshrink.role"] == "search"]
    floor = float(parent.data.tags["min_accuracy"])
    assert floor == parent.data.metrics["baseline_accuracy"] - 0.05
    trials = {"lowrank" in r.data.tags["recipe"]: r for r in runs if r.data.tags["netshrink.role"] == "trial"}
    stopped, kept = trials[True], trials[False]
    assert stopped.info.status == "KILLED" and stopped.data.tags["stopped_early"] == "true" and stopped.data.tags["feasible"] == "false"
    assert float(stopped.data.tags["stopped_at_fraction"]) == 0.25 and "min_accuracy" in stopped.data.tags["stop_reason"]
    assert stopped.data.metrics["accuracy"] < floor and stopped.data.tags.get("pareto") != "true"
    assert kept.info.status == "FINISHED" and kept.data.tags["feasible"] == "true" and "stopped_early" not in kept.data.tags
    curve = client.get_metric_history(kept.info.run_id, "finetune_accuracy")
    assert [m.step for m in curve] == [0, 25, 50, 75, 100]  # before fine-tuning, its first quarter in quarters, each epoch
    assert curve[-1].value == kept.data.metrics["accuracy"]  # the last checkpoint is the model that was measured
    assert [m.step for m in client.get_metric_history(stopped.info.run_id, "finetune_accuracy")] == [0, 25]
    study = optuna.load_study(study_name=parent.data.tags["optuna.study_name"], storage=parent.data.tags["optuna.storage"])
    (stopped_trial,) = [t for t in study.trials if "stopped_early" in t.user_attrs]
    assert stopped_trial.state == optuna.trial.TrialState.COMPLETE and stopped_trial.user_attrs["stopped_early"] == 0.25
    assert stopped_trial.constraints["min_accuracy"] > 0 and stopped_trial.values[0] == stopped.data.metrics["accuracy"]
