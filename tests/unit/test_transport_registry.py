"""The one transport interface: every update mode names a registered transport, the registry imports
it by name and refuses what it does not know, and a transport refuses a request it cannot serve
before it touches anything (`UpdateError(engine_touched=False)`)."""

from __future__ import annotations

from typing import Any

import pytest
from hotswap_api import protocol
from hotswap_engine.transport import base


def test_every_update_mode_has_a_transport_of_that_name() -> None:
    for mode in protocol.UpdateMode:
        cls = base.transport_factory(mode.value)
        assert isinstance(cls, type) and issubclass(cls, base.Transport)
        assert cls.name == mode.value
    assert base.transport_factory("Broadcast").delivers_to_engine is True
    assert base.transport_factory("P2P").delivers_to_engine is False


def test_unknown_and_duplicate_names_are_refused() -> None:
    with pytest.raises(KeyError, match=r"no transport 'carrier-pigeon'.*Broadcast, P2P"):
        base.create_transport("carrier-pigeon", object())
    with pytest.raises(ValueError, match="registered already"):
        base.register_transport("P2P", "somewhere", "Else")


def test_a_registered_name_must_build_a_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(base._REGISTRY, "not-a-transport", base._Entry("collections", "OrderedDict"))
    with pytest.raises(TypeError, match="does not implement"):
        base.create_transport("not-a-transport")


class _Host:
    p2p: Any = None


def test_p2p_without_an_endpoint_refuses_before_touching_anything() -> None:
    transport = base.create_transport("P2P", _Host())
    req = protocol.UpdateRequest.model_validate(
        {
            "version": "v2",
            "mode": "P2P",
            "peers": [
                {
                    "pod": "pod-0",
                    "source": {
                        "endpoint": "127.0.0.1:1234",
                        "version": "v2",
                        "buffers": [{"segment": 0, "address": 4096, "nbytes": 100}],
                        "layout_address": 8192,
                        "layout_nbytes": 10,
                        "layout_sha256": "0" * 64,
                    },
                }
            ],
        }
    )
    with pytest.raises(base.UpdateError, match="peer-to-peer is unavailable") as err:
        transport.job(req, None)
    assert err.value.engine_touched is False
