"""Aggregation kernels against a float64 reference, across dtypes, threads and sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from emberfl import aggregate, store


def reference(xs: list[np.ndarray], w: np.ndarray, normalize: bool) -> np.ndarray:
    acc = sum(float(wi) * x.astype(np.float64) for wi, x in zip(w, xs, strict=False))
    assert isinstance(acc, np.ndarray)
    return acc / w.sum() if normalize else acc


@settings(max_examples=60, deadline=None)
@given(
    n=hs.integers(1, 21),
    length=hs.integers(1, 20_000),
    seed=hs.integers(0, 2**32 - 1),
    normalize=hs.booleans(),
)
def test_matches_float64_reference(n: int, length: int, seed: int, normalize: bool) -> None:
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(length).astype(np.float32) for _ in range(n)]
    w = rng.uniform(0.0, 10.0, n)
    w[rng.integers(n)] += 0.5  # never all zero
    fn = aggregate.weighted_mean if normalize else aggregate.weighted_sum
    out = fn(xs, w)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    ref = reference(xs, w, normalize)
    scale = float(np.abs(w).sum() / (w.sum() if normalize else 1.0))
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=2e-6 * n * max(scale, 1.0))


@pytest.mark.parametrize("length", [1, 4095, 4097, 200_003])
def test_bitwise_identical_for_any_thread_count(length: int) -> None:
    rng = np.random.default_rng(length)
    xs = [torch.from_numpy(rng.standard_normal(length).astype(np.float32)) for _ in range(19)]
    w = rng.uniform(0.1, 3.0, 19)
    base = aggregate.weighted_mean(xs, w, threads=1)
    assert isinstance(base, torch.Tensor)
    for threads in (2, 3, 4, 8):
        other = aggregate.weighted_mean(xs, w, threads=threads)
        assert isinstance(other, torch.Tensor)
        assert torch.equal(base.view(torch.int32), other.view(torch.int32)), threads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(10_000, generator=g).to(dtype) for _ in range(30)]
    w = [float(i + 1) for i in range(30)]
    out = aggregate.weighted_mean(xs, w, threads=2)
    ref = sum(wi * x.double() for wi, x in zip(w, xs, strict=False)) / sum(w)
    assert isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)
    # float32 accumulation: far better than summing in the input's own precision.
    assert float((out.double() - ref).abs().max()) < 1e-5


def test_inputs_mapped_from_store_files(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    states = [
        {"a": torch.randn(300, generator=g), "b": torch.randn(7, 5, generator=g)} for _ in range(6)
    ]
    flats = []
    for i, s in enumerate(states):
        store.save(tmp_path / f"u{i}.safetensors", s)
        flats.append(store.open_file(tmp_path / f"u{i}.safetensors").flat())
    out = torch.empty(flats[0].numel())
    result = aggregate.weighted_mean(flats, [1, 2, 3, 4, 5, 6], out=out)
    assert result is out
    expected = (
        sum(
            w * torch.cat([s["a"], s["b"].reshape(-1)]).double()
            for w, s in zip(range(1, 7), states, strict=False)
        )
        / 21
    )
    assert isinstance(expected, torch.Tensor)
    assert float((out.double() - expected).abs().max()) < 1e-5


def test_out_buffers_and_accumulate() -> None:
    xs = [np.full(5000, i + 1, dtype=np.float32) for i in range(4)]
    out_np = np.empty(5000, dtype=np.float32)
    assert aggregate.weighted_sum(xs, [1, 1, 1, 1], out=out_np) is out_np
    np.testing.assert_array_equal(out_np, np.full(5000, 10.0, dtype=np.float32))

    acc = torch.zeros(5000)
    for i, x in enumerate(xs):
        aggregate.accumulate(acc, torch.from_numpy(x), weight=0.5 * (i + 1))
    assert torch.equal(acc, torch.full((5000,), 0.5 * (1 + 4 + 9 + 16)))


def test_errors() -> None:
    a = torch.ones(10)
    with pytest.raises(ValueError, match="empty"):
        aggregate.weighted_mean([], [])
    with pytest.raises(ValueError, match="has 11 elements"):
        aggregate.weighted_mean([a, torch.ones(11)], [1, 1])
    with pytest.raises(TypeError, match="mix dtypes"):
        aggregate.weighted_mean([a, a.half()], [1, 1])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        aggregate.weighted_mean([a.double()], [1])
    with pytest.raises(ValueError, match="1-D"):
        aggregate.weighted_mean([torch.ones(2, 5)], [1])
    with pytest.raises(ValueError, match="non-negative"):
        aggregate.weighted_mean([a, a], [1, -1])
    with pytest.raises(ValueError, match="all weights are zero"):
        aggregate.weighted_mean([a, a], [0, 0])
    with pytest.raises(ValueError, match="expected 2 weights"):
        aggregate.weighted_mean([a, a], [1])
    with pytest.raises(ValueError, match="out has 9"):
        aggregate.weighted_mean([a], [1], out=torch.empty(9))
    with pytest.raises(TypeError, match="float32"):
        aggregate.weighted_mean([a], [1], out=torch.empty(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="overlap"):
        aggregate.weighted_mean([a], [1], out=a)
    with pytest.raises(ValueError, match="contiguous"):
        aggregate.weighted_mean([torch.ones(20)[::2]], [1])


def test_core_rejects_arrays_whose_dtype_is_not_the_kind() -> None:
    # Same item size, other type: read as the kind's bits they would give wrong numbers.
    from emberfl import _core

    out = np.zeros(4, dtype=np.float32)
    cases = [
        (np.arange(4, dtype=np.int32), "f32", "float32", "int32"),
        (np.zeros(4, dtype=">f4"), "f32", "float32", ">f4"),
        (np.zeros(4, dtype=np.uint16), "f16", "float16", "uint16"),
        (np.zeros(4, dtype=np.int16), "bf16", "uint16", "int16"),
        (np.zeros(4, dtype=np.float16), "bf16", "uint16", "float16"),
    ]
    for x, kind, want, got in cases:
        needle = rf'inputs\[0\]: expected a {want} array.* for kind "{kind}", got {got}'
        with pytest.raises(TypeError, match=needle):
            _core.weighted_sum([x], kind, [1.0], out)
        with pytest.raises(TypeError, match=needle):
            _core.find_nonfinite([x], kind)
        with pytest.raises(TypeError, match=rf"x: expected a {want} array"):
            _core.accumulate(out, x, kind, 1.0)
    with pytest.raises(TypeError, match="out: expected a float32 array, got int32"):
        _core.weighted_sum([out], "f32", [1.0], np.zeros(4, dtype=np.int32))
    with pytest.raises(TypeError, match='unsupported input dtype "f64"'):
        _core.find_nonfinite([out], "f64")
    assert out.tolist() == [0.0] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_results_are_bitwise_those_of_float32_steps_in_client_order(dtype: torch.dtype) -> None:
    """Each element is ``((0 + f0*x0) + f1*x1) + ...`` in float32, whatever the threads."""
    g = torch.Generator().manual_seed(5)
    n, length = 11, 10_007  # more than a group of clients, more than a block
    xs = [torch.randn(length, generator=g).to(dtype) for _ in range(n)]
    w = [0.25 + (i * 7 % 5) for i in range(n)]
    total = 0.0
    for wi in w:  # in order, as the core sums in f64 (not compensated like builtin sum)
        total += wi

    def steps(factors: list[float]) -> np.ndarray:
        acc = np.zeros(length, dtype=np.float32)
        for f, x in zip(factors, xs, strict=True):
            acc = acc + np.float32(f) * x.float().numpy()
        return acc

    mean_ref = steps([wi / total for wi in w]).view(np.uint32)
    sum_ref = steps(w).view(np.uint32)
    for threads in (1, 3):
        mean = aggregate.weighted_mean(xs, w, threads=threads)
        total_sum = aggregate.weighted_sum(xs, w, threads=threads)
        assert isinstance(mean, torch.Tensor) and isinstance(total_sum, torch.Tensor)
        np.testing.assert_array_equal(mean.numpy().view(np.uint32), mean_ref)
        np.testing.assert_array_equal(total_sum.numpy().view(np.uint32), sum_ref)
    acc = torch.zeros(length)
    for wi, x in zip(w, xs, strict=True):
        aggregate.accumulate(acc, x, wi, threads=2)
    np.testing.assert_array_equal(acc.numpy().view(np.uint32), sum_ref)


def test_nonfinite_inputs_are_reported() -> None:
    good = torch.ones(8192)
    bad = torch.ones(8192)
    bad[5000] = float("nan")
    inf = torch.ones(8192).half()
    inf[1] = float("inf")
    with pytest.raises(aggregate.NonFiniteError, match=r"inputs \[1, 3\]"):
        aggregate.weighted_mean([good, bad, good, bad], [1, 1, 1, 1])
    assert aggregate.find_nonfinite([good, bad, good, bad], threads=2) == [1, 3]
    assert aggregate.find_nonfinite([inf.float(), good]) == [0]
    assert aggregate.find_nonfinite([inf, good.half()]) == [0]
    out = aggregate.weighted_mean([good, bad], [1, 1], check_finite=False)
    assert isinstance(out, torch.Tensor)
    assert torch.isnan(out[5000]) and float(out[0]) == 1.0
    assert issubclass(aggregate.NonFiniteError, ValueError)
