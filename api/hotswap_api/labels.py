"""Labels, annotations and the pod condition hotswap writes, and the one reserved version name.

Every key lives under the API group, so `kubectl get pods -l hotswap.dev/pool=NAME` finds a pool's
pods and nothing of ours collides with another controller's keys.
"""

from __future__ import annotations

GROUP = "hotswap.dev"

# ---- labels (pods) ------------------------------------------------------------------------------
POOL_LABEL = f"{GROUP}/pool"
"""The InferencePool a pod belongs to (the pool's name)."""
VERSION_LABEL = f"{GROUP}/weight-version"
"""The version a pod serves (`BASE_VERSION` for the checkpoint it started with)."""

# ---- pod condition ------------------------------------------------------------------------------
READINESS_GATE = f"{GROUP}/weights-ready"
"""The readiness gate (and pod condition) the operator sets once a pod serves the pool's version."""

# ---- annotations --------------------------------------------------------------------------------
SPEC_HASH = f"{GROUP}/spec-hash"
"""On the objects the operator renders (Deployment, Service...): the hash of the desired spec."""
CREATED_BY = f"{GROUP}/created-by"
"""On WeightVersions: the tool that created it (`hotswap-cli`)."""
ROLLBACK_OF = f"{GROUP}/rollback-of"
"""On WeightVersions `hotswap rollback` creates: the version it rolled back from."""

# The label value of pods that serve the checkpoint they started with (`spec.model.path`).
# WeightVersion forbids it as a version name, so it can never mean two things.
BASE_VERSION = "base"
