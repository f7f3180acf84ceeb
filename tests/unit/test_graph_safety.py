"""graph_safety: tensors a reload replaces go back onto the storage captured graphs read."""

from __future__ import annotations

import torch
from hotswap_engine.inference import graph_safety


class _Helper:
    def __init__(self) -> None:
        self.scale = torch.ones(4)


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3, 4), requires_grad=False)
        self.register_buffer("table", torch.arange(6.0))
        self.derived = torch.full((2,), 5.0)  # a plain tensor attribute
        self.quant_method = _Helper()


def _model() -> torch.nn.Module:
    m = torch.nn.Module()
    m.layer = _Layer()
    return m


def test_replaced_tensors_go_back_with_the_new_values() -> None:
    model = _model()
    layer = model.layer
    originals = {
        "weight": (layer.weight, layer.weight.data_ptr()),
        "table": (layer.table, layer.table.data_ptr()),
        "derived": (layer.derived, layer.derived.data_ptr()),
        "scale": (layer.quant_method.scale, layer.quant_method.scale.data_ptr()),
    }
    slots = graph_safety.snapshot(model)
    # what post-load processing may do: new objects, and a storage swap under the same object
    layer.weight.data = torch.full((3, 4), 7.0)
    layer.table = torch.arange(6.0) * 2
    layer.derived = torch.full((2,), 9.0)
    layer.quant_method.scale = torch.full((4,), 3.0)
    assert sorted(graph_safety.moved(slots)) == [
        "layer.derived",
        "layer.quant_method.scale",
        "layer.table",
        "layer.weight",
    ]

    report = graph_safety.restore(slots)

    assert sorted(report.restored) == [
        "layer.derived",
        "layer.quant_method.scale",
        "layer.table",
        "layer.weight",
    ]
    assert report.changed == [] and report.removed == []
    for name, current in {
        "weight": layer.weight,
        "table": layer.table,
        "derived": layer.derived,
        "scale": layer.quant_method.scale,
    }.items():
        obj, ptr = originals[name]
        assert current is obj, name
        assert current.data_ptr() == ptr, name
    assert torch.equal(layer.weight, torch.full((3, 4), 7.0))
    assert torch.equal(layer.table, torch.arange(6.0) * 2)
    assert torch.equal(layer.derived, torch.full((2,), 9.0))
    assert torch.equal(layer.quant_method.scale, torch.full((4,), 3.0))
    assert graph_safety.moved(slots) == []


def test_untouched_model_is_left_alone() -> None:
    model = _model()
    slots = graph_safety.snapshot(model)
    model.layer.weight.data.copy_(torch.ones(3, 4))  # in place: nothing moved
    report = graph_safety.restore(slots)
    assert report.restored == [] and report.changed == [] and report.removed == []


def test_shape_changes_and_removals_are_reported_not_forced() -> None:
    model = _model()
    slots = graph_safety.snapshot(model)
    model.layer.derived = torch.zeros(5)  # another shape: cannot go back in place
    del model.layer.table
    report = graph_safety.restore(slots)
    assert report.changed == ["layer.derived"]
    assert report.removed == ["layer.table"]
    assert model.layer.derived.shape == (5,)
    assert sorted(graph_safety.moved(slots)) == ["layer.derived", "layer.table"]
