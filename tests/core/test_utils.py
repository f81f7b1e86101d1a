"""Model (de)serialization and the SHMHandle placeholder helpers."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from emberfl.core import (
    SHMHandle,
    deserialize_model,
    process_tensors_in_object,
    reconstruct_from_shared_memory,
    serialize_model,
)


@dataclass
class Buffer:
    cid: int
    model_parameters: torch.Tensor | SHMHandle
    data_size: int
    metadata: dict[str, float] | None = None


Pair = namedtuple("Pair", ["a", "b"])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    )


def test_serialize_then_deserialize_restores_every_state_entry() -> None:
    src = _model()
    src(torch.randn(8, 4))  # updates BatchNorm's running stats and counter
    flat = serialize_model(src)
    expected = sum(t.numel() for t in src.state_dict().values())
    assert flat.shape == (expected,) and flat.device.type == "cpu"
    dst = _model()
    with torch.no_grad():
        for p in dst.parameters():
            p.add_(1.0)
    deserialize_model(dst, flat)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a.to(b.dtype), b), name


def test_deserialize_refuses_a_vector_of_the_wrong_length() -> None:
    model = _model()
    with pytest.raises(ValueError, match="state values"):
        deserialize_model(model, torch.zeros(3))


def test_replace_mode_swaps_tensors_for_handles_without_touching_the_original() -> None:
    t = torch.ones(3)
    pkg = {
        "buf": Buffer(1, t, 10, {"loss": 1.0}),
        "list": [t, 2, (t, "x")],
        "pair": Pair(t, 5),
    }
    handles = process_tensors_in_object(pkg, mode="replace")
    assert isinstance(handles["buf"].model_parameters, SHMHandle)
    assert handles["buf"].cid == 1 and handles["buf"].metadata == {"loss": 1.0}
    assert isinstance(handles["list"][0], SHMHandle) and handles["list"][1] == 2
    assert isinstance(handles["list"][2][0], SHMHandle) and handles["list"][2][1] == "x"
    assert isinstance(handles["pair"], Pair) and isinstance(handles["pair"].a, SHMHandle)
    assert pkg["buf"].model_parameters is t  # original untouched
    assert pkg["list"][0] is t


def test_replace_mode_handles_cycles() -> None:
    node: list[object] = [torch.zeros(1)]
    node.append(node)
    out = process_tensors_in_object(node, mode="replace")
    assert isinstance(out[0], SHMHandle)
    assert out[1] is out


def test_move_mode_shares_tensors_in_place() -> None:
    t = torch.zeros(4)
    pkg = Buffer(0, t, 1)
    assert process_tensors_in_object(pkg, mode="move") is pkg
    assert t.is_shared()
    with pytest.raises(ValueError, match="mode"):
        process_tensors_in_object(pkg, mode="copy")  # type: ignore[arg-type]


def test_reconstruct_takes_tensors_from_the_buffer_and_the_rest_from_the_handle() -> None:
    buffer = Buffer(cid=-1, model_parameters=torch.arange(4.0), data_size=0)
    returned = Buffer(cid=7, model_parameters=SHMHandle(), data_size=123, metadata={"a": 1.0})
    merged = reconstruct_from_shared_memory(returned, buffer)
    assert merged.cid == 7 and merged.data_size == 123 and merged.metadata == {"a": 1.0}
    assert merged.model_parameters is buffer.model_parameters
    assert isinstance(returned.model_parameters, SHMHandle)  # inputs untouched

    nested_buffer = {"w": [torch.ones(2), torch.zeros(1)], "n": 0}
    nested = {"w": [SHMHandle(), torch.full((1,), 9.0)], "n": 4}
    out = reconstruct_from_shared_memory(nested, nested_buffer)
    assert out["w"][0] is nested_buffer["w"][0]
    assert torch.equal(out["w"][1], torch.full((1,), 9.0))
    assert out["n"] == 4


def test_reconstruct_reports_a_structure_mismatch() -> None:
    with pytest.raises(ValueError, match="structure"):
        reconstruct_from_shared_memory([SHMHandle(), SHMHandle()], [torch.zeros(1)])
    with pytest.raises(KeyError, match="missing"):
        reconstruct_from_shared_memory({"missing": SHMHandle()}, {"other": torch.zeros(1)})


@dataclass
class Holder:
    """An object whose attributes sit two levels below it (object, then ``__dict__``)."""

    top: torch.Tensor
    inner: Buffer
    items: list[torch.Tensor]


def _holder() -> Holder:
    return Holder(
        top=torch.zeros(1),
        inner=Buffer(cid=3, model_parameters=torch.ones(2), data_size=1),
        items=[torch.full((1,), 2.0)],
    )


def test_replace_mode_leaves_tensors_below_max_depth_untouched() -> None:
    # BlazeFL counts an object's attributes two levels down: with max_depth=2 the
    # holder's own tensor (depth 2) is replaced, but the list items (depth 3) and the
    # inner object's tensor (depth 4) stay the very tensors they were.
    pkg = _holder()
    out = process_tensors_in_object(pkg, mode="replace", max_depth=2)
    assert isinstance(out.top, SHMHandle)
    assert out.items is pkg.items and out.items[0] is pkg.items[0]
    assert out.inner is pkg.inner and out.inner.model_parameters is pkg.inner.model_parameters
    # One level more reaches the list items, three more the inner object's tensor.
    deeper = process_tensors_in_object(pkg, mode="replace", max_depth=3)
    assert isinstance(deeper.items[0], SHMHandle)
    assert deeper.inner.model_parameters is pkg.inner.model_parameters
    deepest = process_tensors_in_object(pkg, mode="replace", max_depth=4)
    assert isinstance(deepest.inner.model_parameters, SHMHandle)
    assert pkg.inner.model_parameters.dtype == torch.float32  # the original is untouched


def test_max_depth_counts_container_items_one_level_down() -> None:
    t = torch.zeros(1)
    nested = {"a": [t, {"b": t}]}
    out = process_tensors_in_object(nested, mode="replace", max_depth=2)
    assert isinstance(out["a"][0], SHMHandle)  # depth 2
    assert out["a"][1] is nested["a"][1]  # a dict at depth 2 is not entered
    # An object whose __dict__ lies at max_depth is copied but not entered.
    shallow = process_tensors_in_object(_holder(), mode="replace", max_depth=1)
    assert isinstance(shallow, Holder) and isinstance(shallow.top, torch.Tensor)


def test_move_mode_respects_max_depth() -> None:
    pkg = _holder()
    process_tensors_in_object(pkg, mode="move", max_depth=2)
    assert pkg.top.is_shared()
    assert not pkg.items[0].is_shared()
    assert not pkg.inner.model_parameters.is_shared()
    process_tensors_in_object(pkg, mode="move", max_depth=4)
    assert pkg.items[0].is_shared() and pkg.inner.model_parameters.is_shared()
