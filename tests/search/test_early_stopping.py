"""A hopeless trial stopped for real, through Ray, Optuna and MLflow."""


def test_a_hopeless_trial_is_stopped_in_its_first_quarter_once_the_search_has_calibrated_and_logged_as_such(tmp_path):
    """Low-rank at 1% of the rank (fc1 through one dimension) leaves LeNet-5 far from usable. Until five trials of the
    search have shown what fine-tuning recovers, no trial is stopped (the prior: any rise); after that, such a trial is
    stopped at its first checkpoint past the grace, measured as it stood, and told to Optuna as complete but infeasible."""
    import subprocess
    import sys
    import textwrap

    import optuna
    from mlflow.tracking import MlflowClient

    from netshrink.deploy.stopping import MIN_CURVES

    (tmp_path / "exp.yaml").write_text(
        textwrap.dedent(
            """
            name: stopping
            task: {dataset_args: {image_size: 16}, train: {epochs: 3}}
            finetune: {epochs: 1}
            search: {trials: 9, max_concurrent: 1, sampler: random, seed: 2, informed_start: false}
            measure: {warmup: 5, repeats: 50}
            space:
              lowrank: {enabled: search, rank_fraction: 0.01}
              pruning: {enabled: true, granularity: [weight], ratio: {low: 0.1, high: 0.6}, steps: 1, scope: [layer]}
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
    trials = sorted((r for r in runs if r.data.tags["netshrink.role"] == "trial"), key=lambda r: r.info.start_time)
    stopped_runs = [r for r in trials if r.data.tags.get("stopped_early") == "true"]
    assert stopped_runs
    for stopped in stopped_runs:  # none before the search had seen five trials recover: one at a time, so they had all ended
        assert trials.index(stopped) >= MIN_CURVES
        assert '"kind":"lowrank"' in stopped.data.tags["recipe"] and "this search's trials" in stopped.data.tags["stop_reason"]
    stopped = stopped_runs[0]
    assert stopped.info.status == "KILLED" and stopped.data.tags["feasible"] == "false" and "min_accuracy" in stopped.data.tags["stop_reason"]
    assert float(stopped.data.tags["stopped_at_fraction"]) == 0.25
    assert stopped.data.metrics["accuracy"] < floor and stopped.data.tags.get("pareto") != "true"
    assert "recovery allowed by share of fine-tuning done" in stopped.data.tags["stop_rule"]
    kept = next(r for r in trials if r.info.status == "FINISHED" and r.data.tags["feasible"] == "true")
    assert "stopped_early" not in kept.data.tags
    curve = client.get_metric_history(kept.info.run_id, "finetune_accuracy")
    assert [m.step for m in curve] == [0, 25, 50, 75, 100]  # before fine-tuning, its first quarter in quarters, each epoch
    assert curve[-1].value == kept.data.metrics["accuracy"]  # the last checkpoint is the model that was measured
    assert [m.step for m in client.get_metric_history(stopped.info.run_id, "finetune_accuracy")] == [0, 25]
    study = optuna.load_study(study_name=parent.data.tags["optuna.study_name"], storage=parent.data.tags["optuna.storage"])
    stopped_trials = [t for t in study.trials if "stopped_early" in t.user_attrs]
    assert len(stopped_trials) == len(stopped_runs)
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["stopped_early"] == 0.25 for t in stopped_trials)
    assert all(t.constraints["min_accuracy"] > 0 for t in stopped_trials)
