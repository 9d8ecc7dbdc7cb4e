"""The method itself: feature hooks, the variational estimators, the objective and its alignment terms. No IO."""
