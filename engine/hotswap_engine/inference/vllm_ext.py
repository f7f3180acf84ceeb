"""vLLM worker extension: receive a version over the hand-off and apply it with vLLM's layerwise reload.

Started with `--worker-extension-cls hotswap_engine.inference.vllm_ext.HotswapWorkerExtension`; vLLM appends
the class to its worker's bases, so `self` is the worker (CPUWorker / GPU Worker). The launcher's
control socket triggers `hotswap_apply` through `engine_client.collective_rpc`, which the engine core
runs between steps in every worker at once (one per TP rank).

Why `reload_weights(weights_iterator=..., is_checkpoint_format=True)`: it puts each layer back into
checkpoint format, buffers a layer's weights until the layer is complete, then runs the layer's
post-load processing (CPU prepacking, quantization) and copies the result into the original kernel
tensors, so CUDA graphs and prepacked CPU weights stay valid. `model.load_weights` alone skips that
processing and breaks prepacked/quantized layers. Each TP worker receives whole tensors; the
model's weight loaders take this rank's slice, exactly as on a cold start.

Nothing here is reachable from outside the pod: the only trigger is the launcher's unix socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from hotswap_engine.handoff import HandoffError, HandoffReceiver
from hotswap_engine.inference import graph_safety
from hotswap_engine.inference.digest import fingerprint

# Under "vllm." so vLLM's logging setup (handler, format, VLLM_LOGGING_LEVEL) covers these lines.
log = logging.getLogger("vllm.hotswap.worker")


class HotswapApplyError(RuntimeError):
    """An update failed in a worker; the message names the rank and the underlying error type."""


class HotswapWorkerExtension:
    """Mixed into vLLM's worker. Holds no attributes of its own: vLLM refuses extension classes whose
    attribute names collide with the worker's, and any state here would outlive a failed update."""

    def hotswap_apply(self, endpoint: str, version: str, timeout: float = 60.0) -> dict[str, Any]:
        """Receive `version` from the agent's HandoffSender at `endpoint` (`{rank}` is replaced with
        this worker's rank) and reload the model's weights from it. Returns what was applied."""
        worker: Any = self
        rank = int(worker.rank)
        device = _worker_device(worker)
        start = time.perf_counter()
        rx = HandoffReceiver(endpoint.replace("{rank}", str(rank)), rank, device, timeout=timeout)
        try:
            sent = rx.wait_begin()
            if sent != version:
                raise HandoffError(f"the agent is sending version {sent!r}, /apply asked for {version!r}")
            counted = _Counter(rx.weights())
            model = worker.model_runner.get_model()
            slots = graph_safety.snapshot(model)
            try:
                worker.reload_weights(weights_iterator=counted, is_checkpoint_format=True)
            except BaseException:
                _abandon_layerwise_reload(model)
                graph_safety.restore(slots)
                raise
            kept = graph_safety.restore(slots)
            if kept.changed or kept.removed:
                # Not fatal: such a tensor may be one no graph reads; the names say where to look.
                log.warning(
                    "hotswap: rank %d: reload replaced tensors that cannot be put back in place: "
                    "changed %s, removed %s",
                    rank,
                    kept.changed[:20],
                    kept.removed[:20],
                )
            rx.done()
        except Exception as e:
            message = f"rank {rank}: {type(e).__name__}: {e}"
            rx.fail(message)
            log.warning("hotswap: failed to apply %s: %s", version, message)
            # vLLM passes only the message back through collective_rpc: keep the type in it.
            raise HotswapApplyError(message) from e
        finally:
            rx.close()
        seconds = time.perf_counter() - start
        log.info(
            "hotswap: rank %d applied %s (%d tensors) in %.3fs; %d replaced tensors put back in place",
            rank,
            version,
            counted.tensors,
            seconds,
            len(kept.restored),
        )
        return {
            "rank": rank,
            "version": version,
            "tensors": counted.tensors,
            "bytes": counted.nbytes,
            "seconds": seconds,
            "restored": kept.restored[:50],
            "moved": (kept.changed + kept.removed)[:50],
        }

    def hotswap_digests(self) -> dict[str, str]:
        """Fingerprints (`digest`) of every parameter and buffer of this worker's model,
        in the format vLLM keeps them (after loading and processing): comparable across pods of one
        configuration, and with a checkpoint wherever vLLM keeps checkpoint bytes."""
        worker: Any = self
        model = worker.model_runner.get_model()
        out = {f"param:{n}": fingerprint(p) for n, p in model.named_parameters()}
        out.update({f"buffer:{n}": fingerprint(b) for n, b in model.named_buffers()})
        return out


class _Counter:
    def __init__(self, it: Iterator[tuple[str, torch.Tensor]]) -> None:
        self._it = it
        self.tensors = 0
        self.nbytes = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self._it:
            self.tensors += 1
            self.nbytes += t.numel() * t.element_size()
            yield name, t


def _worker_device(worker: Any) -> torch.device:
    device = getattr(worker, "device", None)
    if isinstance(device, torch.device):
        return device
    return torch.device(worker.model_runner.device)


def _abandon_layerwise_reload(model: torch.nn.Module) -> None:
    """Put every layer that was waiting for more weights back on its kernel tensors.

    `reload_weights` moves layers to the meta device and wraps their weight loaders until all of a
    layer's weights arrived; if the stream stops midway (abort, dead agent), those layers would stay
    on meta (the next forward fails) and keep the partial weights buffered (the next reload would
    count them and process a layer before it is complete). Layers already processed keep their new
    values: the model then holds a mix of versions, which the agent repairs by re-sending a complete
    version before the pod is ready again.
    """
    from vllm.model_executor.model_loader.reload import layerwise

    for layer in model.modules():
        info = layerwise.get_layerwise_info(layer)
        if not info.can_load():
            continue
        if info.kernel_tensors is not None:
            layerwise._place_kernel_tensors(layer, info)
        info.reset()
    layerwise.LOADING_LAYERS.clear()
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
