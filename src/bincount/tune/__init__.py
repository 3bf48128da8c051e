"""Hyperparameter search: one search space (`space`), run as a Katib Experiment (`katib`) or an optuna study
(`local`), both writing the same `tuning/<experiment>/` outputs (`results`)."""
