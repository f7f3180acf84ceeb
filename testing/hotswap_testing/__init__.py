"""Test harnesses: tiny models, synthetic checkpoints, a plain launcher and receiver standing in for
vLLM, a broadcast member process, and the hand-off self-check.

Used by tests/, bench/ and demo/ (found through PYTHONPATH, like the other packages); never shipped:
the engine image does not copy it, `pip install` does not install it, and the engine, operator and
CLI never import it (an import-linter contract in pyproject.toml).
"""
