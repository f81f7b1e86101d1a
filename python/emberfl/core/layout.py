"""Where a model's trainable parameters sit in its serialized state vector.

:func:`emberfl.core.serialize_model` flattens the whole ``state_dict`` -- trainable
parameters and buffers such as batch-norm statistics -- into one vector, which is
what clients upload and the server averages. Server optimizers (FedAdam, ...) and
control variates (SCAFFOLD) concern the trainable parameters only; a
:class:`ParameterLayout` says which spans of the state vector those are, and moves
values between the full vector and a compact parameters-only vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ParameterLayout"]


@dataclass(frozen=True)
class ParameterLayout:
    """The spans ``[start, stop)`` of a model's trainable parameters in its state vector.

    ``size`` is the length of the state vector (``serialize_model``), ``names`` the
    state-dict keys of the trainable parameters, in state-dict order, and ``spans``
    their positions. The parameters-only vector concatenates the spans in that order.
    """

    size: int
    names: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        """The layout of ``model``'s ``state_dict`` as ``serialize_model`` flattens it."""
        trainable = {
            name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad
        }
        names: list[str] = []
        spans: list[tuple[int, int]] = []
        offset = 0
        for name, tensor in model.state_dict().items():
            n = tensor.numel()
            if name in trainable:
                names.append(name)
                spans.append((offset, offset + n))
            offset += n
        return cls(size=offset, names=tuple(names), spans=tuple(spans))

    @property
    def num_params(self) -> int:
        """Length of the parameters-only vector."""
        return sum(stop - start for start, stop in self.spans)

    @property
    def dense(self) -> bool:
        """Whether the parameters fill the whole state vector (a model without buffers)."""
        return self.num_params == self.size

    def _check(self, vector: torch.Tensor, length: int, what: str) -> None:
        if vector.dim() != 1 or vector.numel() != length:
            raise ValueError(
                f"{what} must be a 1-D vector of {length} values, got shape {tuple(vector.shape)}"
            )

    def gather(self, state: torch.Tensor) -> torch.Tensor:
        """The parameters-only vector of ``state`` (a view when the layout is dense)."""
        self._check(state, self.size, "state vector")
        if self.dense:
            return state
        return torch.cat([state[start:stop] for start, stop in self.spans])

    def scatter_(self, state: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Write the parameters-only vector ``params`` into ``state`` in place; returns it."""
        self._check(state, self.size, "state vector")
        self._check(params, self.num_params, "parameter vector")
        if self.dense:
            state.copy_(params)
            return state
        offset = 0
        for start, stop in self.spans:
            n = stop - start
            state[start:stop].copy_(params[offset : offset + n])
            offset += n
        return state

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """``model``'s trainable parameters in the order of the parameters-only vector."""
        by_name = dict(model.named_parameters(remove_duplicate=False))
        try:
            return [by_name[name] for name in self.names]
        except KeyError as exc:
            raise ValueError(f"the model has no parameter {exc} of this layout") from None

    def split(self, params: torch.Tensor) -> list[torch.Tensor]:
        """Views of the parameters-only vector ``params``, one per parameter (flat)."""
        self._check(params, self.num_params, "parameter vector")
        return list(torch.split(params, [stop - start for start, stop in self.spans]))
