"""The search: Ray Tune trials steered by Optuna, tracked in MLflow, and the resulting Pareto front."""
