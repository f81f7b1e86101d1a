"""ExactSum against exact rational arithmetic, and its order independence, bytes and errors."""

from __future__ import annotations

import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from emberfl.aggregate import ExactSum, NonFiniteError, OutOfRangeError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def to_f32(q: Fraction) -> float:
    """``q`` rounded once to the nearest float32, ties to even (inf past the largest)."""
    if q == 0:
        return 0.0
    sign, q = (-1 if q < 0 else 1), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    ulp = Fraction(2) ** (max(e, -126) - 23)
    v = round(q / ulp) * ulp  # round() on a Fraction is half to even
    return sign * (float(v) if v < 2**128 else float("inf"))


def grid_term(x: float, w: float, grid: int) -> int:
    """The kernel's term: one float64 multiply, then the nearest multiple of 2**-grid."""
    return round(Fraction(x * w) * 2**grid)


def values(rng: np.random.Generator, n: int, dtype: torch.dtype, limit: float) -> torch.Tensor:
    """Finite values of every kind the dtype holds: normal, tiny, subnormal, huge, zero."""
    info = torch.finfo(dtype)
    kinds = rng.integers(0, 6, n)
    exps = np.where(
        kinds == 0,
        rng.uniform(-3, 3, n),  # ordinary
        np.where(
            kinds == 1,
            rng.uniform(np.log2(info.tiny) - 10, np.log2(info.tiny), n),  # subnormal
            np.where(
                kinds == 2,
                rng.uniform(min(np.log2(info.tiny), -60), -60, n),  # tiny, around the grid
                rng.uniform(-40, np.log2(min(limit, float(info.max))) - 1, n),  # up to large
            ),
        ),
    )
    exps = np.minimum(exps, np.log2(limit) - 1)
    v = rng.choice([-1.0, 1.0], n) * 2.0**exps
    v[kinds == 5] = 0.0
    return torch.from_numpy(v).to(dtype)


def bits(t: torch.Tensor) -> list[int]:
    return t.view(torch.int32).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", [64, 0, 90])
def test_matches_fraction_reference(dtype: torch.dtype, grid: int) -> None:
    rng = np.random.default_rng(grid + len(str(dtype)))
    n, length = 7, 60
    weights = [1.0, 600.0, 0.1, 1 / 3, 2.0**-12, 12345.0, 0.0]
    limit = 2.0 ** (103 - grid) / max(weights)
    xs = [values(rng, length, dtype, limit) for _ in range(n)]
    s = ExactSum(length, grid=grid)
    for x, w in zip(xs, weights, strict=True):
        s.add(x, w)
    total = sum(Fraction(w) for w in weights)
    assert s.total_weight == float(total) and s.count == n
    mean, summed = s.finish(), s.finish_sum()
    assert mean.dtype == torch.float32 and mean.shape == (length,)
    for j in range(length):
        exact = sum(grid_term(float(x[j]), w, grid) for x, w in zip(xs, weights, strict=True))
        assert float(summed[j]) == to_f32(Fraction(exact, 2**grid)), j
        assert float(mean[j]) == to_f32(Fraction(exact, 2**grid) / total), j


def test_numpy_inputs_and_exact_ties() -> None:
    # Two float32 neighbours with equal weights: the mean is a tie, rounded once, to even.
    s = ExactSum(2)
    s.add(np.array([1.0, 3.0], dtype=np.float32), 3)
    s.add(np.array([1.0 + 2.0**-23, 3.0], dtype=np.float32), 3)
    assert s.finish().tolist() == [1.0, 3.0]
    h = ExactSum(1)
    h.add(np.array([0.5], dtype=np.float16), 2)
    assert h.finish_sum().tolist() == [1.0]


def test_values_at_the_grid_limits() -> None:
    s = ExactSum(4)  # grid 64: quantum 2^-64, terms below 2^39
    below = float(np.nextafter(np.float32(2.0**39), np.float32(0)))
    x = torch.tensor([below, 2.0**-65, 3 * 2.0**-66, -(2.0**-65)], dtype=torch.float32)
    s.add(x, 1.0)
    # Half a quantum ties to 0 (even); three quarters round to one quantum.
    assert s.finish_sum().tolist() == [below, 0.0, 2.0**-64, 0.0]
    with pytest.raises(OutOfRangeError, match=r"x\[0\]"):
        s.add(torch.tensor([2.0**39, 0, 0, 0]), 1.0)
    with pytest.raises(OutOfRangeError, match=r"x\[2\]"):
        s.add(torch.tensor([1.0, 0, 2.0**38, 0]), 2.0)
    assert s.count == 1 and s.finish_sum().tolist() == [below, 0.0, 2.0**-64, 0.0]
    assert s.term_limit == 2.0**39


@settings(max_examples=40, deadline=None)
@given(
    n=hs.integers(1, 12),
    length=hs.integers(0, 300),
    seed=hs.integers(0, 2**32 - 1),
    data=hs.data(),
)
def test_any_order_and_split_gives_the_same_bits(
    n: int, length: int, seed: int, data: hs.DataObject
) -> None:
    rng = np.random.default_rng(seed)
    dtype = data.draw(hs.sampled_from(DTYPES))
    xs = [values(rng, length, dtype, 2.0**20) for _ in range(n)]
    ws = [float(rng.choice([1.0, 7.0, 0.1, 1 / 3, 250.0])) for _ in range(n)]
    whole = ExactSum(length)
    for x, w in zip(xs, ws, strict=True):
        whole.add(x, w)
    order = data.draw(hs.permutations(range(n)))
    parts = data.draw(hs.integers(1, n))
    assign = [data.draw(hs.integers(0, parts - 1)) for _ in range(n)]
    partial = [ExactSum(length, threads=data.draw(hs.integers(1, 3))) for _ in range(parts)]
    for i in order:
        partial[assign[i]].add(xs[i], ws[i])
    merge_order = data.draw(hs.permutations(range(parts)))
    # Through bytes, as a partial sum from another process would arrive.
    merged = ExactSum.from_bytes(partial[merge_order[0]].to_bytes())
    for k in merge_order[1:]:
        merged.merge(ExactSum.from_bytes(partial[k].to_bytes()))
    assert merged.to_bytes() == whole.to_bytes()
    if length and any(ws):
        assert bits(merged.finish()) == bits(whole.finish())


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_identical_for_any_thread_count(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    xs = [(torch.randn(300_001, generator=g) * 100).to(dtype) for _ in range(3)]
    results = []
    for threads in (1, 2, 3, 8):
        s = ExactSum(300_001, threads=threads)
        for i, x in enumerate(xs):
            s.add(x, i + 0.5)
        results.append((s.to_bytes(), bits(s.finish()), bits(s.finish_sum())))
    assert all(r == results[0] for r in results)


def test_merge_with_itself_doubles() -> None:
    s = ExactSum(3)
    s.add(torch.tensor([1.0, -2.0, 0.25]), 2.0)
    s.merge(s)
    assert s.count == 2 and s.total_weight == 4.0
    assert s.finish_sum().tolist() == [4.0, -8.0, 1.0]
    assert s.finish().tolist() == [1.0, -2.0, 0.25]


def test_bytes_format_and_round_trip() -> None:
    s = ExactSum(5, grid=70)
    s.add(torch.tensor([1.0, -1.0, 0.5, 0.0, 3.0]), 0.5)
    data = s.to_bytes()
    assert len(data) == 48 + 16 * 5
    magic, version, grid, length, count = struct.unpack_from("<8sIIQQ", data)
    assert (magic, version, grid, length, count) == (b"EMBFLXS\0", 1, 70, 5, 1)
    assert int.from_bytes(data[32:48], "little", signed=True) == 2**63  # 0.5 * 2^64
    assert int.from_bytes(data[48 + 16 : 64 + 16], "little", signed=True) == -(2**69)
    array = s.to_array()
    assert array.dtype == np.uint8 and array.tobytes() == data
    for blob in (data, bytearray(data), memoryview(data), array, torch.from_numpy(array)):
        back = ExactSum.from_bytes(blob)
        assert back.to_bytes() == data and back.grid == 70 and len(back) == 5
    assert repr(back).startswith("ExactSum(length=5, grid=70, count=1")


def test_merge_bytes_reads_in_place_and_refuses_corruption_whole() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = ExactSum(50_000), ExactSum(50_000)
    a.add(torch.randn(50_000, generator=g), 3.0)
    b.add(torch.randn(50_000, generator=g), 0.25)
    merged = ExactSum.from_bytes(a.to_bytes())
    merged.merge(b)
    via_bytes = ExactSum.from_bytes(a.to_bytes(), threads=3)
    via_bytes.merge_bytes(b.to_array())
    assert via_bytes.to_bytes() == merged.to_bytes()
    corrupt = b.to_array()
    corrupt[48 + 16 * 40_000 + 15] = 0x7F
    before = via_bytes.to_bytes()
    with pytest.raises(ValueError, match="element 40000 exceeds"):
        via_bytes.merge_bytes(corrupt)
    assert via_bytes.to_bytes() == before
    with pytest.raises(ValueError, match="3 elements but the sum has 50000"):
        via_bytes.merge_bytes(ExactSum(3).to_bytes())
    with pytest.raises(TypeError, match="uint8"):
        via_bytes.merge_bytes(np.zeros(4, dtype=np.float32))


def test_corrupt_bytes() -> None:
    s = ExactSum(4)
    s.add(torch.ones(4), 1.0)
    data = s.to_bytes()
    with pytest.raises(ValueError, match="shorter than the 48-byte header"):
        ExactSum.from_bytes(data[:20])
    with pytest.raises(ValueError, match="truncated"):
        ExactSum.from_bytes(data[:-3])
    with pytest.raises(ValueError, match="bad magic"):
        ExactSum.from_bytes(b"X" + data[1:])
    with pytest.raises(ValueError, match="unsupported version 9"):
        ExactSum.from_bytes(data[:8] + struct.pack("<I", 9) + data[12:])
    with pytest.raises(ValueError, match="element 2 exceeds"):
        corrupt = bytearray(data)
        corrupt[48 + 32 + 15] = 0x7F
        ExactSum.from_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="count"):
        ExactSum.from_bytes(data[:24] + struct.pack("<Q", 2**40) + data[32:])


def test_errors() -> None:
    s = ExactSum(4)
    with pytest.raises(ValueError, match="5 elements but the sum has 4"):
        s.add(torch.ones(5), 1.0)
    with pytest.raises(NonFiniteError, match="NaN at index 2"):
        s.add(torch.tensor([1.0, 2.0, float("nan"), 1.0]), 1.0)
    with pytest.raises(NonFiniteError, match="inf at index 0"):
        s.add(torch.tensor([float("-inf"), 0, 0, 0], dtype=torch.bfloat16), 1.0)
    for w in (float("nan"), float("inf"), 2.0**39, 2.0**-70):
        with pytest.raises(ValueError, match="weights must be finite"):
            s.add(torch.ones(4), w)
    with pytest.raises(ValueError, match="total weight is zero"):
        s.finish()
    assert s.count == 0 and s.finish_sum().tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="grid"):
        s.merge(ExactSum(4, grid=60))
    with pytest.raises(ValueError, match="3 elements"):
        s.merge(ExactSum(3))
    with pytest.raises(TypeError, match="expected an ExactSum"):
        s.merge(np.zeros(4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grid 101"):
        ExactSum(4, grid=101)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        s.add(torch.ones(4, dtype=torch.float64), 1.0)
    m = ExactSum(1, grid=0)
    m.add(torch.tensor([1e30]), 2.0)
    m.add(torch.tensor([0.0]), -(2.0 - 2.0**-40))
    with pytest.raises(OutOfRangeError, match="beyond the float32 range"):
        m.finish()
