"""Model selection by name, as in BlazeFL 3.0."""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch

__all__ = ["ModelSelector"]

# BlazeFL bounds this by enum.StrEnum, which Python 3.10 lacks; every StrEnum (and
# every ``class Name(str, Enum)``) is a str, so the bound admits the same names.
ModelName = TypeVar("ModelName", bound=str, contravariant=True)


class ModelSelector(Protocol[ModelName]):
    """Builds a model from its name."""

    def select_model(self, model_name: ModelName) -> torch.nn.Module:
        """A new instance of the model called ``model_name``."""
        raise NotImplementedError(f"{type(self).__name__} must implement select_model")
