"""vLLM worker extension: read-only views of a worker for the launcher's control socket.

Started with `--worker-extension-cls hotswap_engine.inference.vllm_ext.HotswapWorkerExtension` (the
launcher adds it); vLLM appends the class to its worker's bases, so `self` is the worker (CPUWorker /
GPU Worker). Updates do not pass through here: they ride vLLM's weight-transfer lifecycle
(`hotswap_engine.inference.vllm_transfer_engine`). What the lifecycle does not offer is here:

- `hotswap_report`: what the last update applied in this worker (the lifecycle methods return
  nothing through the engine client);
- `hotswap_digests`: fingerprints of the model's tensors in our own format, which every vLLM we
  support can compute (vLLM 0.26 has no `compute_weight_checksums`);
- `hotswap_checksums`: vLLM's `compute_weight_checksums` (sha256 of each processed parameter),
  for a vLLM that lacks it (0.26); the launcher calls vLLM's own where it exists.

Nothing here is reachable from outside the pod: the only trigger is the launcher's unix socket.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from hotswap_engine.digest import fingerprint
from hotswap_engine.inference import vllm_plugin

# vLLM imports this class in every worker before it creates the weight-transfer engine, so this
# registers the hotswap engine even where the package's entry point is not installed (a source
# checkout on PYTHONPATH, as in bench/vllm_gpu_check.py); installed, the entry point did it already.
vllm_plugin.register()


class HotswapWorkerExtension:
    """Mixed into vLLM's worker. Holds no attributes of its own: vLLM refuses extension classes whose
    attribute names collide with the worker's."""

    def hotswap_report(self) -> dict[str, Any] | None:
        """The last finished update in this worker: rank, version, tensors, bytes, seconds, the
        tensors graph_safety put back in place (`restored`) and those it could not (`moved`)."""
        engine = getattr(self, "weight_transfer_engine", None)
        report = getattr(engine, "last_report", None)
        return dict(report) if isinstance(report, dict) else None

    def hotswap_digests(self) -> dict[str, str]:
        """Fingerprints (hotswap_engine.digest) of every parameter and buffer of this worker's model,
        in the format vLLM keeps them (after loading and processing): comparable across pods of one
        configuration, and with a checkpoint wherever vLLM keeps checkpoint bytes."""
        worker: Any = self
        model = worker.model_runner.get_model()
        out = {f"param:{n}": fingerprint(p) for n, p in model.named_parameters()}
        out.update({f"buffer:{n}": fingerprint(b) for n, b in model.named_buffers()})
        return out

    def hotswap_checksums(self) -> dict[str, str]:
        """What vLLM 0.32's Worker.compute_weight_checksums answers: sha256 of each parameter's bytes
        as the worker keeps them, keyed "tp<rank>:<name>" (vLLM's key has dp/pp/pcp too; 0.26 has
        no pcp group, and the keys only need to match between pods running the same vLLM)."""
        worker: Any = self
        model = worker.model_runner.get_model()
        rank = int(worker.vllm_config.parallel_config.rank)
        return {
            f"tp{rank}:{name}": hashlib.sha256(
                p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
            ).hexdigest()
            for name, p in model.named_parameters()
        }
