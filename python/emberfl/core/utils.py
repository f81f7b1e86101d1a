"""Model (de)serialization and the shared-memory uplink helpers of BlazeFL's API.

``serialize_model`` / ``deserialize_model`` flatten a model's ``state_dict`` into one
vector and back. ``SHMHandle``, ``process_tensors_in_object`` and
``reconstruct_from_shared_memory`` implement the placeholder protocol that BlazeFL
subclasses use with ``prepare_uplink_package_buffer``: a worker fills a pre-built
buffer in place and returns a copy of its package whose tensors are replaced by
``SHMHandle()`` markers; the runtime merges the two. emberfl serves that protocol
from memory-mapped files, so these helpers only ever walk small object graphs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

__all__ = [
    "SHMHandle",
    "deserialize_model",
    "process_tensors_in_object",
    "reconstruct_from_shared_memory",
    "serialize_model",
]

T = TypeVar("T")


@dataclass(frozen=True)
class SHMHandle:
    """Marker standing for "the tensor at this place in the uplink buffer".

    A worker that filled ``shm_buffer`` in place returns its package with the filled
    tensors replaced by ``SHMHandle()``; :func:`reconstruct_from_shared_memory` puts
    the buffer's tensors back in their places.
    """


def process_tensors_in_object(obj: T, mode: Literal["move", "replace"], max_depth: int = 10) -> T:
    """Walk ``obj`` (lists, tuples, dicts, objects with ``__dict__``) and act on its tensors.

    ``mode="move"`` calls ``share_memory_()`` on every tensor, in place, and returns
    ``obj`` itself. ``mode="replace"`` returns a copy of the structure in which every
    tensor is an :class:`SHMHandle`; the original is left untouched. Shared and
    circular references are visited once.

    Depth counts as in BlazeFL: ``obj`` is at depth 0, the items of a list, tuple or
    dict one deeper than it, and an object's attributes two deeper (its ``__dict__``
    is a level of its own). Tensors down to depth ``max_depth`` are processed; a
    container at depth ``max_depth`` is not entered, so everything below it is left
    as it is (in "replace" mode, the very same objects).
    """
    if mode not in ("move", "replace"):
        raise ValueError(f"mode must be 'move' or 'replace', got {mode!r}")
    if mode == "move":
        _share_tensors(obj, max_depth)
        return obj
    replaced: T = _replace_tensors(obj, max_depth, {})
    return replaced


def _share_tensors(root: object, max_depth: int) -> None:
    seen: set[int] = set()

    def visit(node: object, depth: int) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, torch.Tensor):
            node.share_memory_()  # type: ignore[no-untyped-call]
            return
        if depth >= max_depth:
            return
        if isinstance(node, list | tuple):
            for item in node:
                visit(item, depth + 1)
        elif isinstance(node, dict):
            for value in node.values():
                visit(value, depth + 1)
        elif hasattr(node, "__dict__"):
            visit(vars(node), depth + 1)

    visit(root, 0)


def _replace_tensors(node: Any, depth_left: int, memo: dict[int, Any]) -> Any:
    key = id(node)
    if key in memo:
        return memo[key]
    if isinstance(node, torch.Tensor):
        return SHMHandle()
    if depth_left <= 0:
        return node
    if isinstance(node, list):
        new_list: list[Any] = []
        memo[key] = new_list  # registered first so a cycle resolves to the copy
        new_list.extend(_replace_tensors(item, depth_left - 1, memo) for item in node)
        return new_list
    if isinstance(node, tuple):
        items = [_replace_tensors(item, depth_left - 1, memo) for item in node]
        # namedtuples take their fields positionally; plain tuples take an iterable.
        new_tuple = type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
        memo[key] = new_tuple
        return new_tuple
    if isinstance(node, dict):
        new_dict = copy.copy(node)  # keeps the dict subclass (OrderedDict, defaultdict)
        memo[key] = new_dict
        for k, v in node.items():
            new_dict[k] = _replace_tensors(v, depth_left - 1, memo)
        return new_dict
    if hasattr(node, "__dict__") and not isinstance(node, type):
        new_obj = copy.copy(node)
        memo[key] = new_obj
        # The attributes sit two levels down: the object, then its __dict__.
        if depth_left - 1 <= 0:
            return new_obj
        for k, v in vars(node).items():
            # object.__setattr__ also works for frozen dataclasses.
            object.__setattr__(new_obj, k, _replace_tensors(v, depth_left - 2, memo))
        return new_obj
    memo[key] = node
    return node


def reconstruct_from_shared_memory(handle_obj: T, shm_obj: T) -> T:
    """Merge a package holding :class:`SHMHandle` markers with the buffer it came from.

    Both objects are walked together; wherever ``handle_obj`` holds an ``SHMHandle``
    the value at the same place in ``shm_obj`` is used, everywhere else the value of
    ``handle_obj``. Returns a new object; neither input is modified.
    """
    result: T = _merge(handle_obj, shm_obj, {})
    return result


def _merge(h: Any, s: Any, memo: dict[int, Any]) -> Any:
    key = id(h)
    if key in memo:
        return memo[key]
    if isinstance(h, SHMHandle):
        return s
    if isinstance(h, torch.Tensor):
        return h
    if isinstance(h, list):
        _check_same_length(h, s)
        new_list: list[Any] = []
        memo[key] = new_list
        new_list.extend(_merge(hi, si, memo) for hi, si in zip(h, s, strict=True))
        return new_list
    if isinstance(h, tuple):
        _check_same_length(h, s)
        items = [_merge(hi, si, memo) for hi, si in zip(h, s, strict=True)]
        new_tuple = type(h)(*items) if hasattr(h, "_fields") else type(h)(items)
        memo[key] = new_tuple
        return new_tuple
    if isinstance(h, dict):
        new_dict = copy.copy(h)
        memo[key] = new_dict
        for k, v in h.items():
            if isinstance(v, SHMHandle) or _holds_handle(v):
                if not isinstance(s, dict) or k not in s:
                    raise KeyError(f"the uplink buffer has no entry {k!r} for an SHMHandle")
                new_dict[k] = _merge(v, s[k], memo)
        return new_dict
    if hasattr(h, "__dict__") and not isinstance(h, type):
        new_obj = copy.copy(h)
        memo[key] = new_obj
        s_vars = vars(s) if hasattr(s, "__dict__") else {}
        for k, v in vars(h).items():
            if isinstance(v, SHMHandle) or _holds_handle(v):
                if k not in s_vars:
                    raise AttributeError(
                        f"the uplink buffer has no attribute {k!r} for an SHMHandle"
                    )
                object.__setattr__(new_obj, k, _merge(v, s_vars[k], memo))
        return new_obj
    return h


def _holds_handle(node: Any, depth: int = 0) -> bool:
    """Whether an SHMHandle occurs anywhere below ``node`` (so the buffer side is needed)."""
    if isinstance(node, SHMHandle):
        return True
    if isinstance(node, torch.Tensor) or depth > 32:
        return False
    if isinstance(node, list | tuple):
        return any(_holds_handle(x, depth + 1) for x in node)
    if isinstance(node, dict):
        return any(_holds_handle(x, depth + 1) for x in node.values())
    if hasattr(node, "__dict__") and not isinstance(node, type):
        return any(_holds_handle(x, depth + 1) for x in vars(node).values())
    return False


def _check_same_length(h: list[Any] | tuple[Any, ...], s: Any) -> None:
    if not isinstance(s, list | tuple) or len(s) != len(h):
        got = len(s) if isinstance(s, list | tuple) else type(s).__name__
        raise ValueError(
            f"package and uplink buffer differ in structure: a sequence of {len(h)} "
            f"items against {got}"
        )


def serialize_model(model: torch.nn.Module, cpu: bool = True) -> torch.Tensor:
    """Every ``state_dict`` entry of ``model``, flattened and concatenated in order.

    Mixed dtypes are promoted as :func:`torch.cat` does (a BatchNorm's int64 counter
    becomes a float). ``cpu=True`` returns the vector on the CPU.
    """
    parts = [t.detach().reshape(-1) for t in model.state_dict().values()]
    if not parts:
        raise ValueError(f"{type(model).__name__} has an empty state_dict: nothing to serialize")
    flat = torch.cat(parts)
    return flat.cpu() if cpu else flat


def deserialize_model(model: torch.nn.Module, serialized_parameters: torch.Tensor) -> None:
    """Copy a vector made by :func:`serialize_model` back into ``model``'s state, in place."""
    state = model.state_dict()
    expected = sum(t.numel() for t in state.values())
    if serialized_parameters.dim() != 1 or serialized_parameters.numel() != expected:
        raise ValueError(
            f"{type(model).__name__} holds {expected} state values, got a vector of shape "
            f"{tuple(serialized_parameters.shape)}"
        )
    offset = 0
    with torch.no_grad():
        for tensor in state.values():
            n = tensor.numel()
            tensor.copy_(serialized_parameters[offset : offset + n].view(tensor.shape))
            offset += n
