"""hotswap's weight-transfer engine for vLLM's weight-transfer lifecycle (registered by vllm_plugin).

vLLM creates one per worker (one per tensor-parallel rank) when started with
`--weight-transfer-config '{"backend": "hotswap"}'`; the launcher drives it through the engine
client's lifecycle methods, which vLLM runs in every worker at once between steps:

  init_weight_transfer_engine({})            nothing to rendezvous: each update names its endpoint
  start_weight_update()                      vLLM's layerwise reload starts (layers wait for weights)
  update_weights({"endpoint", "version", "timeout"})
                                             connect to the agent's HandoffSender (`{rank}` in the
                                             endpoint becomes this worker's rank), receive the whole
                                             version bucket by bucket (ZeroMQ + msgpack descriptions,
                                             bytes in CUDA IPC / shared-memory slots), load it through
                                             the model's weight loaders (each rank takes its slice),
                                             finalize the layerwise reload
  finish_weight_update(weight_version=...)   tell the agent this rank is done

Why finalize inside update_weights, not in finish_weight_update: vLLM's worker ends the update session
when update_weights raises, but not when finish_weight_update raises (the next start would then be
refused for good). So every step that can fail runs in update_weights, and a failure there leaves
the model runnable: see `_abandon`.

CUDA graphs: the layerwise reload copies processed weights back into the original parameters, but
post-load processing may still replace helper tensors a captured graph reads; graph_safety puts them
back (snapshot in start_weight_update, restore after finalizing).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import set_current_vllm_config
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from hotswap_engine.digest import fingerprint
from hotswap_engine.handoff import HandoffError, HandoffReceiver
from hotswap_engine.handoff.sender import DEFAULT_TIMEOUT_S
from hotswap_engine.inference import graph_safety

# Tests only (set by test pod templates, never by the chart or the images): `MODULE:PATH`, a hook
# module of the test tooling and a file that asks one pod to corrupt a received tensor. The test
# tooling is not in the images: set anywhere else, every update fails loudly instead of corrupting.
CORRUPT_HOOK_ENV = "HOTSWAP_TEST_CORRUPT_RECEIVED"

# Under "vllm." so vLLM's logging setup (handler, format, VLLM_LOGGING_LEVEL) covers these lines.
log = logging.getLogger("vllm.hotswap.worker")


class HotswapApplyError(RuntimeError):
    """An update failed in a worker; the message names the rank and the underlying error type."""


@dataclass
class HotswapInitInfo(WeightTransferInitInfo):
    """Nothing: the agent's hand-off endpoint comes with each update."""


@dataclass
class HotswapUpdateInfo(WeightTransferUpdateInfo):
    endpoint: str  # the agent's HandoffSender; `{rank}` is replaced with this worker's rank
    version: str  # what the agent must be sending (checked against its `begin`)
    timeout: float = DEFAULT_TIMEOUT_S  # per hand-off wait
    # Fingerprint every whole tensor as received (hotswap_engine.received_digests): reported as
    # `received` in this worker's result.
    digests: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, str) or not isinstance(self.version, str) or not self.version:
            raise ValueError("hotswap update_info needs string `endpoint` and `version`")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float) or self.timeout <= 0:
            raise ValueError("hotswap update_info `timeout` must be a positive number of seconds")
        if not isinstance(self.digests, bool):
            raise ValueError("hotswap update_info `digests` must be true or false")


class HotswapWeightTransferEngine(WeightTransferEngine[HotswapInitInfo, HotswapUpdateInfo]):
    init_info_cls = HotswapInitInfo
    update_info_cls = HotswapUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.rank = int(vllm_config.parallel_config.rank)
        # The open update session: graph slots taken at start, the receiver kept for `done`.
        self._slots: dict[str, graph_safety.Slot] | None = None
        self._rx: HandoffReceiver | None = None
        self._finalized = False
        self._report: dict[str, Any] = {}
        self.last_report: dict[str, Any] | None = None  # the last finished update (vllm_ext reads it)

    def init_transfer_engine(self, init_info: HotswapInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        self._close_receiver()
        self._slots = graph_safety.snapshot(self.model)  # before layers move to the meta device
        self._finalized = False
        self._report = {"rank": self.rank, "started": time.perf_counter()}
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """The whole version in one call (the base class's would also synchronize an accelerator,
        which on a CPU-only host with a CUDA build of torch raises)."""
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: HotswapUpdateInfo) -> None:
        if self._slots is None or self._finalized or self._rx is not None:
            raise HotswapApplyError(f"rank {self.rank}: update_weights outside a fresh update session")
        version = update_info.version
        endpoint = update_info.endpoint.replace("{rank}", str(self.rank))
        try:
            rx = self._rx = HandoffReceiver(endpoint, self.rank, self.device, timeout=update_info.timeout)
            sent = rx.wait_begin()
            if sent != version:
                raise HandoffError(f"the agent is sending version {sent!r}, /apply asked for {version!r}")
            counted = _Counter(rx.weights(), update_info.digests, _test_corrupter(version))
            model: Any = self.model  # a vLLM model: load_weights maps checkpoint names, takes the slice
            with set_current_vllm_config(self.vllm_config):  # vLLM 0.26's worker does not set it
                model.load_weights(counted)
            self._finalize()
        except BaseException as e:
            message = f"rank {self.rank}: {type(e).__name__}: {e}"
            log.warning("hotswap: failed to apply %s: %s", version, message)
            if self._rx is not None:
                self._rx.fail(message)
            self._close_receiver()
            self._abandon()
            # vLLM passes only the message back through collective_rpc: keep the type in it.
            raise HotswapApplyError(message) from e
        self._report.update(version=version, tensors=counted.tensors, bytes=counted.nbytes)
        if counted.fingerprints is not None:
            self._report.update(received=counted.fingerprints, digest_seconds=counted.digest_seconds)

    def finish_weight_update(self) -> None:
        if not self._finalized:  # a session without update_weights (the launcher closing a stale one)
            self._finalize()
        rx, self._rx = self._rx, None
        if rx is not None:
            rx.done()
            rx.close()
        report = self._report
        report["seconds"] = time.perf_counter() - report.pop("started", time.perf_counter())
        self.last_report, self._report, self._slots = report, {}, None
        log.info(
            "hotswap: rank %d applied %s (%s tensors) in %.3fs; %d replaced tensors put back in place",
            self.rank,
            report.get("version"),
            report.get("tensors"),
            report["seconds"],
            len(report.get("restored", [])),
        )

    def shutdown(self) -> None:
        self._close_receiver()

    @staticmethod
    def trainer_send_weights(iterator: Any, trainer_args: Any) -> None:
        """Abstract in vLLM 0.26's base class (gone in 0.32): the class must define it to be
        instantiable there. hotswap's sending side is the agent (hotswap_engine.handoff.HandoffSender)."""
        raise NotImplementedError("hotswap sends from its agent's HandoffSender, not from a trainer hook")

    # -- internals -----------------------------------------------------------------------------

    def _finalize(self) -> None:
        """vLLM's layerwise finalize (deferred layers: attention, partially loaded), then the tensors
        captured code reads put back in place."""
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model, self.model_config)
        self._finalized = True
        kept = graph_safety.restore(self._slots or {})
        if kept.changed or kept.removed:
            # Not fatal: such a tensor may be one no graph reads; the names say where to look.
            log.warning(
                "hotswap: rank %d: reload replaced tensors that cannot be put back in place: "
                "changed %s, removed %s",
                self.rank,
                kept.changed[:20],
                kept.removed[:20],
            )
        self._report.update(restored=kept.restored[:50], moved=(kept.changed + kept.removed)[:50])

    def _abandon(self) -> None:
        """Leave a failed update with every layer back on its kernel tensors.

        vLLM's lifecycle has no abort: the layerwise reload moved layers to the meta device and
        wrapped their weight loaders until each layer's weights are complete. Its public finalize is
        the way out: untouched layers get their kernel tensors back, complete ones were processed
        already, and partially received ones are processed with what arrived (values undefined).
        The model then holds a mix of versions, never served: the launcher keeps generation paused
        until a complete version is applied (the agent re-sends the previous one).
        """
        if not self._finalized and self._slots is not None:
            try:
                self._finalize()
            except Exception as e:  # the original error matters more; the next update retries
                log.error("hotswap: rank %d: finalizing an abandoned update failed: %s", self.rank, e)
        self._slots, self._report = None, {}

    def _close_receiver(self) -> None:
        rx, self._rx = self._rx, None
        if rx is not None:
            rx.close()


class _Counter:
    """Counts what passes to the model, and fingerprints each tensor as received when asked (before
    vLLM's loaders and post-processing see it: the bytes that came over the hand-off)."""

    def __init__(
        self,
        it: Iterator[tuple[str, torch.Tensor]],
        digests: bool = False,
        corrupt: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self._it = it
        self._corrupt = corrupt
        self.tensors = 0
        self.nbytes = 0
        self.fingerprints: dict[str, str] | None = {} if digests else None
        self.digest_seconds = 0.0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self._it:
            if self._corrupt is not None:
                t = self._corrupt(name, t)
            self.tensors += 1
            self.nbytes += t.numel() * t.element_size()
            if self.fingerprints is not None:
                t0 = time.perf_counter()
                self.fingerprints[name] = fingerprint(t)
                self.digest_seconds += time.perf_counter() - t0
            yield name, t


def _test_corrupter(version: str) -> Callable[[str, torch.Tensor], torch.Tensor] | None:
    spec = os.environ.get(CORRUPT_HOOK_ENV)
    if not spec:
        return None
    # By a name the test gives, not a static import: shipped code never depends on the test tooling
    # (the import contract), and this line runs only where a test set the variable.
    module_name, sep, path = spec.partition(":")
    if not sep or not path:
        raise HotswapApplyError(f"{CORRUPT_HOOK_ENV} must be MODULE:PATH, got {spec!r}")
    module = importlib.import_module(module_name)
    hook: Callable[[str, torch.Tensor], torch.Tensor] | None = module.corrupter(path, version)
    return hook
