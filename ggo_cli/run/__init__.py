"""A whole run: the runner (lock, plan, state, CSV, manifest), the one-series pipeline,
the worker pool."""
