"""Keep captured CUDA graphs valid across a weight reload: every tensor a forward can read stays where
it was.

A CUDA graph replays the device addresses it saw at capture; torch.compile'd code holds on to the
tensor objects it was traced with. vLLM's layerwise reload copies processed weights back into the
original parameters, but post-load processing may still replace a tensor hanging off a layer (a
buffer, a plain tensor attribute, a quant_method's or attention impl's helper tensor) with a new one
of the same shape: Python then sees the new values while replayed graphs keep reading the old
storage, and the engine serves slightly wrong logits. `snapshot` records every such tensor before the
reload; `restore` copies the new values into the recorded storage and puts the recorded tensor back.
Tensors whose shape, dtype or device changed cannot be restored in place: they are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Helper objects (not modules) whose tensor attributes a layer's forward reads.
_HELPERS = ("quant_method", "impl")


@dataclass(frozen=True)
class Slot:
    owner: Any  # the module or helper object holding the tensor
    kind: str  # "param", "buffer" or "attr"
    attr: str
    tensor: torch.Tensor
    # An alias of the tensor's storage at snapshot time: `tensor.data = other` keeps the object but
    # moves its storage, which a captured graph would not follow.
    storage: torch.Tensor


def _slot(owner: Any, kind: str, attr: str, t: torch.Tensor) -> Slot:
    return Slot(owner, kind, attr, t, t.detach())


@dataclass
class RestoreReport:
    restored: list[str] = field(default_factory=list)  # replaced, copied back into the original storage
    changed: list[str] = field(default_factory=list)  # replaced by a tensor of another shape/dtype/device
    removed: list[str] = field(default_factory=list)  # gone from its owner after the reload


def snapshot(model: torch.nn.Module) -> dict[str, Slot]:
    """Every parameter, buffer and tensor attribute of each module and of its helper objects."""
    out: dict[str, Slot] = {}
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for n, t in m._parameters.items():
            if t is not None:
                out[f"{prefix}{n}"] = _slot(m, "param", n, t)
        for n, t in m._buffers.items():
            if t is not None:
                out[f"{prefix}{n}"] = _slot(m, "buffer", n, t)
        for n, val in vars(m).items():
            if isinstance(val, torch.Tensor) and n not in m._parameters and n not in m._buffers:
                out[f"{prefix}{n}"] = _slot(m, "attr", n, val)
        for helper in _HELPERS:
            obj = getattr(m, helper, None)
            if obj is None or isinstance(obj, torch.nn.Module):
                continue
            for n, val in vars(obj).items():
                if isinstance(val, torch.Tensor):
                    out[f"{prefix}{helper}.{n}"] = _slot(obj, "attr", n, val)
    return out


def _current(slot: Slot) -> Any:
    if slot.kind == "param":
        return slot.owner._parameters.get(slot.attr)
    if slot.kind == "buffer":
        return slot.owner._buffers.get(slot.attr)
    return getattr(slot.owner, slot.attr, None)


def _put_back(slot: Slot) -> None:
    if slot.kind == "param":
        slot.owner._parameters[slot.attr] = slot.tensor
    elif slot.kind == "buffer":
        slot.owner._buffers[slot.attr] = slot.tensor
    else:
        setattr(slot.owner, slot.attr, slot.tensor)


@torch.no_grad()
def restore(slots: dict[str, Slot]) -> RestoreReport:
    """Put back every recorded tensor that the reload replaced (values copied in first)."""
    report = RestoreReport()
    for name, slot in slots.items():
        cur = _current(slot)
        old = slot.storage
        if cur is slot.tensor and (old.is_meta or cur.data_ptr() == old.data_ptr()):
            continue
        if not isinstance(cur, torch.Tensor):
            report.removed.append(name)
            continue
        if (
            old.is_meta
            or cur.is_meta
            or (cur.shape, cur.dtype, cur.device) != (old.shape, old.dtype, old.device)
        ):
            report.changed.append(name)
            continue
        old.copy_(cur.detach())
        if cur is slot.tensor:
            slot.tensor.data = old  # same object, storage moved: back onto the recorded storage
        else:
            if slot.tensor.data_ptr() != old.data_ptr():
                slot.tensor.data = old
            _put_back(slot)
        report.restored.append(name)
    return report


def moved(slots: dict[str, Slot]) -> list[str]:
    """Names whose tensor is no longer the recorded one (after `restore`: what could not be kept)."""
    out = []
    for name, slot in slots.items():
        cur = _current(slot)
        if cur is not slot.tensor or (not slot.storage.is_meta and cur.data_ptr() != slot.storage.data_ptr()):
            out.append(name)
    return out
