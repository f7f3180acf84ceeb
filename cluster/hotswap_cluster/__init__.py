"""Test-side access to the local cluster: start/stop through the project scripts, waiting helpers
with diagnostics, and pytest fixtures (pytest_plugin)."""
