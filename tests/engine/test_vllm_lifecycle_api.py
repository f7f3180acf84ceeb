"""The installed vLLM against what hotswap rides: fails when a vLLM release changes the lifecycle
pieces hotswap calls (the launcher would then refuse to start, see tests/unit/test_vllm_plugin.py)."""

from __future__ import annotations

import pytest
from hotswap_engine.inference import vllm_plugin


def test_installed_vllm_has_the_whole_lifecycle() -> None:
    assert vllm_plugin.lifecycle_gaps() == []
    vllm_plugin.check_vllm()


def test_register_is_idempotent_and_names_an_importable_engine() -> None:
    from hotswap_engine.inference.vllm_transfer_engine import HotswapWeightTransferEngine
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    vllm_plugin.register()
    vllm_plugin.register()  # vLLM loads plugins more than once per process
    assert issubclass(HotswapWeightTransferEngine, WeightTransferEngine)
    assert HotswapWeightTransferEngine.__name__ == vllm_plugin.ENGINE_CLASS
    assert HotswapWeightTransferEngine.__module__ == vllm_plugin.ENGINE_MODULE
    # vLLM instantiates it: nothing of the base class may be left abstract
    assert not getattr(HotswapWeightTransferEngine, "__abstractmethods__", None)


@pytest.mark.parametrize(
    "info",
    [
        {"endpoint": "ipc:///x"},
        {"endpoint": "ipc:///x", "version": ""},
        {"endpoint": "ipc:///x", "version": "v", "timeout": 0},
        {"endpoint": "ipc:///x", "version": "v", "timeout": True},
        {"endpoint": "ipc:///x", "version": "v", "surprise": 1},
    ],
)
def test_bad_update_info_is_refused_before_anything_happens(info: dict[str, object]) -> None:
    from hotswap_engine.inference.vllm_transfer_engine import HotswapUpdateInfo

    with pytest.raises((ValueError, TypeError)):
        HotswapUpdateInfo(**info)  # type: ignore[arg-type]
