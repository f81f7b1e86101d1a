"""Type stubs for the compiled Rust core (``emberfl._core``)."""

import os
from pathlib import Path
from typing import final

import numpy as np
import numpy.typing as npt

__all__ = [
    "ExactSum",
    "MappedFile",
    "NonFiniteError",
    "OutOfRangeError",
    "StoreError",
    "__version__",
    "accumulate",
    "find_nonfinite",
    "save_file",
    "weighted_sum",
]

__version__: str

class StoreError(ValueError):
    """A store file could not be written, or is not a valid safetensors file."""

class NonFiniteError(ValueError):
    """An aggregation met NaN or Inf values."""

class OutOfRangeError(ValueError):
    """An exact sum met a term, a count or a mean beyond its range."""

@final
class ExactSum:
    """An exact, order-independent weighted sum (see ``emberfl.aggregate.ExactSum``)."""

    def __new__(cls, length: int, grid: int = 64) -> ExactSum: ...
    @staticmethod
    def from_bytes(data: npt.NDArray[np.uint8]) -> ExactSum: ...
    def __len__(self) -> int: ...
    @property
    def grid(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def weight_units(self) -> int: ...
    @property
    def term_limit(self) -> float: ...
    def add(
        self, x: npt.NDArray[np.generic], kind: str, weight: float, threads: int = 1
    ) -> None: ...
    def merge(self, other: ExactSum, threads: int = 1) -> None: ...
    def merge_bytes(self, data: npt.NDArray[np.uint8], threads: int = 1) -> None: ...
    def finish(self, threads: int = 1) -> npt.NDArray[np.float32]: ...
    def finish_sum(self, threads: int = 1) -> npt.NDArray[np.float32]: ...
    def to_bytes(self) -> npt.NDArray[np.uint8]: ...

@final
class MappedFile:
    """A validated store file: privately mapped, or read into memory (small files, and
    any file opened with ``copy=True``)."""

    def __new__(cls, path: str | os.PathLike[str], copy: bool = False) -> MappedFile: ...
    @property
    def path(self) -> Path: ...
    @property
    def mapped(self) -> bool: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    def entries(self) -> list[tuple[str, str, list[int], int, int]]: ...
    def arrays(self) -> list[np.ndarray]: ...
    def flat(self, dtype: str) -> np.ndarray: ...

def save_file(
    path: str | os.PathLike[str],
    names: list[str],
    dtypes: list[str],
    shapes: list[list[int]],
    buffers: list[npt.NDArray[np.uint8]],
    metadata: list[tuple[str, str]] | None = None,
    durable: bool = False,
) -> None: ...

# The kernels' `kind` is "f32", "f16" or "bf16"; each input must be a 1-D contiguous
# array of exactly float32, float16 or (bfloat16 bits) uint16, else TypeError.
def weighted_sum(
    inputs: list[npt.NDArray[np.generic]],
    kind: str,
    weights: list[float],
    out: npt.NDArray[np.float32],
    threads: int = 1,
    check_finite: bool = True,
    normalize: bool = True,
) -> None: ...
def accumulate(
    acc: npt.NDArray[np.float32],
    x: npt.NDArray[np.generic],
    kind: str,
    weight: float,
    threads: int = 1,
) -> None: ...
def find_nonfinite(
    inputs: list[npt.NDArray[np.generic]], kind: str, threads: int = 1
) -> list[int]: ...
