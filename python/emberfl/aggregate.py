"""Weighted aggregation of flat parameter vectors, computed by the Rust core.

Inputs are N one-dimensional vectors of equal length and one dtype (float32, float16
or bfloat16): numpy arrays, CPU torch tensors, or tensors mapped from store files
(``MappedFile.flat()``). They are handed to Rust as they are -- nothing is copied
into Python -- and the GIL is released while the kernel runs.

Accumulation is in float32, cache-blocked over groups of clients, and every output
element is summed in the same fixed client order whatever the thread count: the
result is bitwise identical for ``threads=1`` and ``threads=8``.

:class:`ExactSum` is an exact, order-independent accumulator: every term lands on a
fixed binary grid in a 128-bit integer, so any split of the work (by clients, threads
or processes), merged in any order, gives the same bits, and the mean is rounded to
float32 once. Its grid, range and error bound are documented on the class. Every
round's average is made of it (:class:`emberfl.streaming.StreamingSum`, and the
workers' sums of :mod:`emberfl.core.fold`); the float32 kernels above stay for
one-shot means of a list, at about a third of its cost per vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch

from emberfl import _core
from emberfl._core import NonFiniteError, OutOfRangeError

__all__ = [
    "Bytes",
    "ExactSum",
    "NonFiniteError",
    "OutOfRangeError",
    "Vector",
    "accumulate",
    "find_nonfinite",
    "weighted_mean",
    "weighted_sum",
]

Vector: TypeAlias = "torch.Tensor | np.ndarray"
#: Serialized sums: bytes-like objects, uint8 numpy arrays or uint8 CPU tensors.
Bytes: TypeAlias = "bytes | bytearray | memoryview | np.ndarray | torch.Tensor"


def _byte_array(data: Bytes) -> np.ndarray:
    """``data`` as a 1-D uint8 numpy array, without copying."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.device.type != "cpu":
            raise TypeError(f"expected a uint8 CPU tensor, got {data.dtype} on {data.device}")
        return data.detach().reshape(-1).numpy()
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"expected a uint8 array, got {data.dtype}")
        return data.reshape(-1)
    if isinstance(data, bytes | bytearray | memoryview):
        return np.frombuffer(data, dtype=np.uint8)
    raise TypeError(f"expected bytes or a uint8 array, got {type(data).__name__}")


_NUMPY_KIND: dict[object, str] = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
}
_TORCH_KIND: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}


def _as_numpy(x: Vector, what: str) -> tuple[np.ndarray, str]:
    """A zero-copy numpy view of ``x`` and its dtype tag (bf16 travels as uint16 bits)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{what}: tensors must be on the CPU, got {x.device}")
        kind = _TORCH_KIND.get(x.dtype)
        if kind is None:
            raise TypeError(f"{what}: dtype {x.dtype} is not float32, float16 or bfloat16")
        if x.dim() != 1:
            raise ValueError(f"{what}: expected a 1-D vector, got shape {tuple(x.shape)}")
        t = x.detach()
        if kind == "bf16":
            # The core takes bfloat16 as uint16 bits; torch < 2.3 cannot view as uint16.
            return t.view(torch.int16).numpy().view(np.uint16), kind
        return t.numpy(), kind
    if isinstance(x, np.ndarray):
        kind = _NUMPY_KIND.get(x.dtype)
        if kind is None:
            raise TypeError(f"{what}: dtype {x.dtype} is not float32 or float16")
        if x.ndim != 1:
            raise ValueError(f"{what}: expected a 1-D vector, got shape {x.shape}")
        return x, kind
    raise TypeError(f"{what}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _prepare(inputs: Sequence[Vector]) -> tuple[list[np.ndarray], str]:
    if len(inputs) == 0:
        raise ValueError("inputs is empty: nothing to aggregate")
    arrays: list[np.ndarray] = []
    kinds: set[str] = set()
    for i, x in enumerate(inputs):
        arr, kind = _as_numpy(x, f"inputs[{i}]")
        arrays.append(arr)
        kinds.add(kind)
    if len(kinds) != 1:
        raise TypeError(f"inputs mix dtypes {sorted(kinds)}; all must share one dtype")
    return arrays, kinds.pop()


def _out_array(out: Vector | None, length: int) -> tuple[np.ndarray, Vector]:
    if out is None:
        result = torch.empty(length, dtype=torch.float32)
        return result.numpy(), result
    if isinstance(out, torch.Tensor):
        if out.dtype != torch.float32 or out.device.type != "cpu" or out.dim() != 1:
            raise TypeError("out must be a 1-D float32 CPU tensor")
        return out.detach().numpy(), out
    if isinstance(out, np.ndarray):
        if out.dtype != np.float32 or out.ndim != 1:
            raise TypeError("out must be a 1-D float32 array")
        return out, out
    raise TypeError(f"out: expected a torch.Tensor or numpy.ndarray, got {type(out).__name__}")


def _run(
    inputs: Sequence[Vector],
    weights: Sequence[float] | np.ndarray | torch.Tensor,
    out: Vector | None,
    threads: int,
    check_finite: bool,
    normalize: bool,
) -> Vector:
    arrays, kind = _prepare(inputs)
    w = np.asarray(
        weights.tolist() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64
    )
    if w.ndim != 1 or w.shape[0] != len(arrays):
        raise ValueError(f"expected {len(arrays)} weights, got shape {w.shape}")
    out_np, result = _out_array(out, arrays[0].shape[0])
    _core.weighted_sum(arrays, kind, w.tolist(), out_np, threads, check_finite, normalize)
    return result


def weighted_sum(
    inputs: Sequence[Vector],
    weights: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    out: Vector | None = None,
    threads: int = 1,
    check_finite: bool = True,
) -> Vector:
    """``sum_i weights[i] * inputs[i]`` in float32.

    Returns ``out`` when given (a float32 tensor or array of the inputs' length),
    otherwise a new float32 CPU tensor. With ``check_finite`` (the default) a NaN or
    Inf anywhere in the result raises :class:`NonFiniteError`, which names the inputs
    that hold non-finite values.
    """
    return _run(inputs, weights, out, threads, check_finite, normalize=False)


def weighted_mean(
    inputs: Sequence[Vector],
    weights: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    out: Vector | None = None,
    threads: int = 1,
    check_finite: bool = True,
) -> Vector:
    """``sum_i weights[i] * inputs[i] / sum_i weights[i]`` in float32.

    Weights must be finite, non-negative and not all zero. See :func:`weighted_sum`.
    """
    return _run(inputs, weights, out, threads, check_finite, normalize=True)


def accumulate(acc: Vector, x: Vector, weight: float, *, threads: int = 1) -> None:
    """In place ``acc += weight * x``, for aggregating a stream of updates one by one."""
    (arr,), kind = _prepare([x])
    acc_np, _ = _out_array(acc, arr.shape[0])
    _core.accumulate(acc_np, arr, kind, float(weight), threads)


def find_nonfinite(inputs: Sequence[Vector], *, threads: int = 1) -> list[int]:
    """Indices of the inputs that hold at least one NaN or Inf."""
    arrays, kind = _prepare(inputs)
    return list(_core.find_nonfinite(arrays, kind, threads))


class ExactSum:
    """An exact, order-independent weighted sum ``sum_i w_i * x_i`` of vectors of ``length``.

    Each term ``w * x`` is formed once in float64 (one IEEE multiply of the float32,
    float16 or bfloat16 input, exact in float64, by the weight) and rounded to the
    nearest multiple of ``2**-grid``; the integers add up exactly in one 128-bit integer
    per element, and the weights' total is kept exactly too. So adding vectors in any
    order, or into several accumulators merged in any order (:meth:`merge`, also across
    processes via :meth:`to_bytes` / :meth:`from_bytes`), gives the same bits, for any
    ``threads``. :meth:`finish` rounds the weighted mean to float32 once.

    Limits, each a clear error that leaves the sum unchanged: weights must be finite,
    below ``2**39`` in magnitude and multiples of ``2**-64`` (sample counts, 0.1, 1/3
    all are); every term must satisfy ``|w * x| < 2**(103 - grid)`` (5.5e11 at the
    default ``grid=64``, :attr:`term_limit`), else :class:`OutOfRangeError`; NaN or Inf
    inputs raise :class:`NonFiniteError` naming the element; at most ``2**24`` vectors
    go into one sum, merges included. Within those limits no overflow is possible.

    Error: the accumulated sum differs from the exact real one by at most
    ``sum_i (2**-53 * |w_i x_i| + 2**-(grid + 1))``, then one float32 rounding. At the
    default grid that is finer than float32 accumulation for any sum of magnitude at
    least ``n * 2**-40`` (``n`` vectors); see ``rust/src/exact.rs`` for the reasoning.
    """

    __slots__ = ("_core", "threads")

    def __init__(self, length: int, *, grid: int = 64, threads: int = 1) -> None:
        self._core = _core.ExactSum(length, grid)
        self.threads = threads

    @classmethod
    def from_bytes(cls, data: Bytes, *, threads: int = 1) -> ExactSum:
        """An accumulator from :meth:`to_bytes`' output (read in place); corrupt bytes
        raise ``ValueError``."""
        self = cls.__new__(cls)
        self._core = _core.ExactSum.from_bytes(_byte_array(data))
        self.threads = threads
        return self

    def to_bytes(self) -> bytes:
        """The state, little-endian: the 8-byte magic ``EMBFLXS\\0``, u32 version (1),
        u32 grid, u64 length, u64 count of vectors, i128 total weight in units of
        ``2**-64``, then ``length`` i128 sums in units of ``2**-grid`` (48 + 16 * length
        bytes)."""
        return self._core.to_bytes().tobytes()

    def to_array(self) -> np.ndarray:
        """:meth:`to_bytes`' bytes as a new uint8 array (no second copy)."""
        return self._core.to_bytes()

    def __len__(self) -> int:
        return len(self._core)

    def __repr__(self) -> str:
        return (
            f"ExactSum(length={len(self)}, grid={self.grid}, count={self.count}, "
            f"total_weight={self.total_weight!r})"
        )

    @property
    def grid(self) -> int:
        """Fractional bits of the grid: terms are rounded to multiples of ``2**-grid``."""
        return self._core.grid

    @property
    def count(self) -> int:
        """Vectors added, merged ones included."""
        return self._core.count

    @property
    def total_weight(self) -> float:
        """The sum of the weights (exact; shown rounded to the nearest float)."""
        return self._core.weight_units / 2**64

    @property
    def term_limit(self) -> float:
        """Every ``|w * x|`` must be below this."""
        return self._core.term_limit

    def add(self, vector: Vector, weight: float) -> None:
        """Adds ``weight * vector`` (a 1-D float32, float16 or bfloat16 tensor or array)."""
        (arr,), kind = _prepare([vector])
        self._core.add(arr, kind, float(weight), self.threads)

    def merge(self, other: ExactSum) -> None:
        """Adds ``other`` (same length and grid) into this sum."""
        if not isinstance(other, ExactSum):
            raise TypeError(f"expected an ExactSum, got {type(other).__name__}")
        self._core.merge(other._core, self.threads)

    def merge_bytes(self, data: Bytes) -> None:
        """Adds the sum that ``data`` (:meth:`to_bytes`' format, e.g. a mapped file)
        holds, read in place; on ``ValueError`` (corrupt or mismatched) this sum is left
        as it was."""
        self._core.merge_bytes(_byte_array(data), self.threads)

    def finish(self) -> torch.Tensor:
        """The weighted mean ``sum_i w_i x_i / sum_i w_i`` as float32, rounded once.

        Raises ``ValueError`` when the total weight is zero and :class:`OutOfRangeError`
        when a mean is beyond the float32 range.
        """
        return torch.from_numpy(self._core.finish(self.threads))

    def finish_sum(self) -> torch.Tensor:
        """The weighted sum ``sum_i w_i x_i`` as float32, rounded once."""
        return torch.from_numpy(self._core.finish_sum(self.threads))
