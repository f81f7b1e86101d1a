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
