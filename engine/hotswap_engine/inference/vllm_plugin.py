"""vLLM plugin: puts hotswap's weight-transfer engine into vLLM's registry, and checks that the vLLM in
this image has the weight-transfer lifecycle hotswap rides.

`register` is the entry point vLLM calls in every process it starts (API server, engine core,
workers) through the `vllm.general_plugins` group declared in pyproject.toml, so a stock vLLM image
with this package installed accepts `--weight-transfer-config '{"backend": "hotswap"}'`. vLLM may load
plugins several times in one process: registering twice is not an error.

Importing this module imports no vLLM: the launcher checks the version before vLLM starts.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import Any

BACKEND = "hotswap"
ENGINE_MODULE = "hotswap_engine.inference.vllm_transfer_engine"
ENGINE_CLASS = "HotswapWeightTransferEngine"
# The oldest vLLM release hotswap is verified with (the GPU images' 0.26.0); the check below is by
# feature, so it names this version but accepts any release that has the lifecycle.
MIN_VLLM_VERSION = "0.26.0"

# (module, attribute, members it must have): the lifecycle hotswap calls, checked before vLLM starts.
LIFECYCLE_API: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vllm.distributed.weight_transfer.factory", "WeightTransferEngineFactory", ("register_engine",)),
    (
        "vllm.distributed.weight_transfer.base",
        "WeightTransferEngine",
        ("start_weight_update", "update_weights", "finish_weight_update", "set_weight_update_target"),
    ),
    (
        "vllm.v1.engine.async_llm",
        "AsyncLLM",
        (
            "init_weight_transfer_engine",
            "start_weight_update",
            "update_weights",
            "finish_weight_update",
            "pause_generation",
            "resume_generation",
        ),
    ),
    (
        "vllm.model_executor.model_loader.reload",
        "initialize_layerwise_reload",
        (),
    ),
    ("vllm.model_executor.model_loader.reload", "finalize_layerwise_reload", ()),
    ("vllm.config.weight_transfer", "WeightTransferConfig", ()),
)


class UnsupportedVllm(RuntimeError):
    """The installed vLLM lacks the weight-transfer lifecycle (older than MIN_VLLM_VERSION)."""


def lifecycle_gaps(load: Callable[[str], Any] = importlib.import_module) -> list[str]:
    """What of LIFECYCLE_API the vLLM that `load` imports lacks (`module:attr.member`); [] if none."""
    gaps: list[str] = []
    for module_name, attr, members in LIFECYCLE_API:
        try:
            module = load(module_name)
        except ImportError:
            gaps.append(module_name)
            continue
        obj = getattr(module, attr, None)
        if obj is None:
            gaps.append(f"{module_name}:{attr}")
            continue
        gaps += [f"{module_name}:{attr}.{m}" for m in members if not callable(getattr(obj, m, None))]
    return gaps


def unsupported_message(version: str, gaps: list[str]) -> str:
    return (
        f"hotswap needs vLLM >= {MIN_VLLM_VERSION} (its weight-transfer lifecycle); this image has vLLM "
        f"{version}, which lacks {', '.join(gaps[:6])}{' ...' if len(gaps) > 6 else ''}"
    )


def check_vllm() -> None:
    """Raise `UnsupportedVllm` naming the minimum version when the installed vLLM cannot serve us."""
    try:
        import vllm
    except ImportError as e:
        raise UnsupportedVllm(f"hotswap needs vLLM >= {MIN_VLLM_VERSION}; vLLM is not installed") from e
    gaps = lifecycle_gaps()
    if gaps:
        raise UnsupportedVllm(unsupported_message(str(getattr(vllm, "__version__", "?")), gaps))


def register() -> None:
    """vLLM's general-plugin entry point: register the hotswap engine (lazily imported by vLLM)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    # ValueError: already registered in this process (vLLM loads plugins more than once).
    with contextlib.suppress(ValueError):
        WeightTransferEngineFactory.register_engine(BACKEND, ENGINE_MODULE, ENGINE_CLASS)
