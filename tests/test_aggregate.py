"""Aggregation kernels against a float64 reference, across dtypes, threads and sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from emberfl import aggregate, store
from emberfl.streaming import NonFiniteContribution, StreamingSum, flat_f32, mean_of_sum


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


# --- streaming sums ----------------------------------------------------------------------


def _contributions(n: int, length: int, seed: int) -> list[list[tuple[str, torch.Tensor, float]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [
            ("model", torch.randn(length, generator=g), float(i % 5 + 1)),
            ("control", torch.randn(length // 3, generator=g), 1.0 / n),
        ]
        for i in range(n)
    ]


@pytest.mark.parametrize("threads", [1, 3])
def test_streaming_sum_is_bitwise_the_kernel_sum_of_the_list(threads: int) -> None:
    contributions = _contributions(13, 20_003, seed=threads)
    one_by_one = StreamingSum(threads=threads)
    for terms in contributions:
        assert one_by_one.add(terms)
    at_once = StreamingSum(threads=threads)
    assert at_once.add_many(contributions) == [True] * 13
    for k, name in enumerate(("model", "control")):
        column = [terms[k] for terms in contributions]
        listed = aggregate.weighted_sum([v for _, v, _ in column], [w for _, _, w in column])
        assert isinstance(listed, torch.Tensor)
        assert torch.equal(one_by_one.sum(name), listed)
        assert torch.equal(at_once.sum(name), listed)
        total = sum(w for _, _, w in column)
        assert one_by_one.total(name) == at_once.total(name) == total
        assert torch.equal(one_by_one.mean(name), torch.div(listed, total))
        assert torch.equal(at_once.mean(name), mean_of_sum(listed, total))
    assert one_by_one.names == at_once.names == ("model", "control")
    assert one_by_one.count == at_once.count == 13
    # A list folded into sums that already hold something is added item by item.
    half = StreamingSum(threads=threads)
    half.add(contributions[0])
    half.add_many(contributions[1:])
    assert torch.equal(half.sum("model"), one_by_one.sum("model"))


def test_streaming_sum_refuses_nonfinite_contributions_whole() -> None:
    contributions = _contributions(4, 999, seed=5)
    contributions[1][1][1][7] = float("nan")  # control of the second
    contributions[3][0][1][0] = float("-inf")  # model of the fourth

    raising = StreamingSum()
    with pytest.raises(
        aggregate.NonFiniteError, match=r"the control and model terms of contributions \['b', 'd'\]"
    ):
        raising.add_many(contributions, labels=["a", "b", "c", "d"])
    assert raising.count == 0 and raising.names == ()

    clean = [contributions[0], contributions[2]]
    expected = StreamingSum()
    expected.add_many(clean)
    for fold in ("one by one", "at once"):
        skipping = StreamingSum(nonfinite="skip", threads=2)
        if fold == "at once":
            folded = skipping.add_many(contributions, labels=[10, 11, 12, 13])
        else:
            folded = [skipping.add(t, label=10 + i) for i, t in enumerate(contributions)]
        assert folded == [True, False, True, False]
        assert skipping.skipped == [
            NonFiniteContribution(11, ("control",)),
            NonFiniteContribution(13, ("model",)),
        ]
        assert skipping.count == 2
        assert torch.equal(skipping.sum("model"), expected.sum("model"))
        assert torch.equal(skipping.sum("control"), expected.sum("control"))
        assert skipping.totals == expected.totals

    # Labels default to the contribution's position.
    unnamed = StreamingSum(nonfinite="skip")
    unnamed.add(contributions[0])
    unnamed.add(contributions[1])
    assert unnamed.skipped == [NonFiniteContribution(1, ("control",))]


def test_streaming_sum_reports_overflow_and_refuses_its_mean() -> None:
    sums = StreamingSum()
    for _ in range(3):
        sums.add([("model", torch.full((8,), 3e38), 1.0), ("other", torch.ones(8), 2.0)])
    assert sums.overflowed() == ["model"]
    with pytest.raises(aggregate.NonFiniteError, match="sum of the model terms overflowed"):
        sums.mean("model")
    assert torch.equal(sums.mean("other"), torch.ones(8))
    with pytest.raises(aggregate.NonFiniteError, match="overflowed"):
        sums.means()


def test_streaming_sum_errors() -> None:
    sums = StreamingSum()
    with pytest.raises(KeyError, match="nothing has been folded"):
        sums.mean("model")
    sums.add([("model", torch.ones(4), 0.0)])
    with pytest.raises(ValueError, match="finite and > 0"):
        sums.mean("model")
    with pytest.raises(KeyError, match=r"no term 'x' \(terms: \['model'\]\)"):
        sums.sum("x")
    with pytest.raises(ValueError, match=r"terms \['other'\], expected \['model'\]"):
        sums.add([("other", torch.ones(4), 1.0)])
    with pytest.raises(ValueError, match="term 'model' has 5 values, expected 4"):
        sums.add([("model", torch.ones(5), 1.0)])
    with pytest.raises(ValueError, match="must be finite"):
        sums.add([("model", torch.ones(4), float("inf"))])
    with pytest.raises(TypeError, match="must be a number"):
        sums.add([("model", torch.ones(4), "1")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        sums.add([("model", np.ones(4, dtype=np.float32), 1.0)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="non-empty sequence"):
        sums.add([])
    with pytest.raises(ValueError, match="names a term twice"):
        sums.add([("model", torch.ones(4), 1.0), ("model", torch.ones(4), 1.0)])
    with pytest.raises(ValueError, match="2 labels for 1 contributions"):
        StreamingSum().add_many([[("model", torch.ones(4), 1.0)]], labels=[1, 2])
    with pytest.raises(ValueError, match="term 'model' has 3 values, expected 4"):
        StreamingSum().add_many([[("model", torch.ones(4), 1.0)], [("model", torch.ones(3), 1.0)]])
    with pytest.raises(ValueError, match="nonfinite"):
        StreamingSum(nonfinite="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads must be positive"):
        StreamingSum(threads=0)
    # The failed calls folded nothing.
    assert sums.count == 1 and torch.equal(sums.sum("model"), torch.zeros(4))


def test_streaming_sum_flattens_other_shapes_and_dtypes() -> None:
    sums = StreamingSum()
    sums.add([("w", torch.arange(6.0, dtype=torch.float64).view(2, 3), 2.0)])
    sums.add([("w", torch.ones(3, 2, dtype=torch.float16), 1.0)])
    assert torch.equal(sums.sum("w"), torch.arange(6.0) * 2 + 1)
    # The usual uplink (1-D float32 on the CPU) is used as it is, not copied.
    vector = torch.ones(4)
    assert flat_f32(vector) is vector
