"""The shared vocabulary (hotswap_api): one casing for enum values, one enum per concept."""

from __future__ import annotations

import enum
import importlib
import pkgutil
import re

import hotswap_api
from hotswap_api import protocol, resources
from hotswap_api.errors import ErrorCode
from hotswap_api.policy import RequestPolicy

# Kubernetes API conventions: enum values are CamelCase, acronyms in capitals (`TCP`, `P2P`).
CAMEL_CASE = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def _enums() -> list[type[enum.Enum]]:
    found: dict[str, type[enum.Enum]] = {}
    for info in pkgutil.iter_modules(hotswap_api.__path__):
        module = importlib.import_module(f"hotswap_api.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, enum.StrEnum)
                and value.__module__ == module.__name__
            ):
                found[value.__qualname__] = value
    return list(found.values())


def test_every_enum_value_is_camel_case() -> None:
    enums = _enums()
    assert {e.__name__ for e in enums} >= {
        "RequestPolicy",
        "ErrorCode",
        "Strategy",
        "UpdateMode",
        "P2PProtocol",
    }
    wrong = [f"{e.__name__}.{m.name}={m.value!r}" for e in enums for m in e if not CAMEL_CASE.match(m.value)]
    assert not wrong, wrong


def test_one_enum_per_concept_is_shared_by_the_crd_and_the_wire() -> None:
    names = [e.__name__ for e in _enums()]
    assert len(names) == len(set(names)), f"an enum name defined twice: {names}"
    update = resources.UpdatePolicy.model_fields["requests"].annotation
    assert (
        update is RequestPolicy
        and protocol.UpdateRequest.model_fields["request_policy"].annotation is RequestPolicy
    )
    assert protocol.ErrorBody.model_fields["error"].annotation is ErrorCode
    # The fleet strategy and a pod's transfer mode are two concepts spelled alike.
    assert [s.value for s in resources.Strategy] == [m.value for m in protocol.UpdateMode]


def test_other_systems_names_are_mapped_at_the_edge() -> None:
    assert [p.vllm_mode for p in RequestPolicy] == ["keep", "wait", "abort"]
    assert [d.torch for d in resources.Device] == ["cpu", "cuda"]
    assert [p.mooncake for p in resources.P2PProtocol] == ["tcp", "rdma"]


def test_strategy_defaults_to_broadcast() -> None:
    spec = resources.WeightVersionSpec.model_validate(
        {"poolRef": {"name": "p"}, "version": "v1", "source": {"path": "ckpt"}}
    )
    assert spec.strategy is resources.Strategy.BROADCAST


def test_permanent_error_codes() -> None:
    assert {c for c in ErrorCode if c.permanent} == {
        ErrorCode.BAD_REQUEST,
        ErrorCode.CHECKPOINT_MISMATCH,
        ErrorCode.FORBIDDEN_PATH,
        ErrorCode.UNAUTHORIZED,
    }


def test_objects_stored_with_the_old_spellings_still_parse() -> None:
    spec = resources.WeightVersionSpec.model_validate(
        {"poolRef": {"name": "p"}, "version": "v1", "source": {"path": "c"}, "strategy": "auto"}
    )
    assert spec.strategy is resources.Strategy.BROADCAST
    assert resources.Strategy("p2p") is resources.Strategy.P2P
    engine = resources.EngineSpec.model_validate({"device": "cpu", "transport": {"p2pProtocol": "rdma"}})
    assert (
        engine.device is resources.Device.CPU and engine.transport.p2p_protocol is resources.P2PProtocol.RDMA
    )
    # ... but the CRD schema, and so every new write, knows only the new spelling.
    schema = resources.WeightVersionSpec.model_json_schema()
    assert schema["$defs"]["Strategy"]["enum"] == ["Broadcast", "P2P"]
