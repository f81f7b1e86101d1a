"""StreamingSum: exact named sums, order- and split-independent, across processes."""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emberfl import aggregate, store
from emberfl.streaming import NonFiniteContribution, StreamingSum, flat_vector


def _contributions(n: int, length: int, seed: int) -> list[list[tuple[str, torch.Tensor, float]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [
            ("model", torch.randn(length, generator=g), float(i % 5 + 1)),
            ("control", torch.randn(length // 3, generator=g).half(), 1.0),
        ]
        for i in range(n)
    ]


def _exact_mean(column: list[tuple[str, torch.Tensor, float]]) -> torch.Tensor:
    """The weighted mean in exact rationals, rounded to float32 once (via float64,
    close enough for the tolerance below)."""
    total = sum(Fraction(w) for _, _, w in column)
    vectors = [[Fraction(float(x)) for x in v.float().tolist()] for _, v, _ in column]
    out = [
        sum(Fraction(w) * vec[j] for (_, _, w), vec in zip(column, vectors, strict=True)) / total
        for j in range(len(vectors[0]))
    ]
    return torch.tensor([float(x) for x in out], dtype=torch.float64).float()


@pytest.mark.parametrize("threads", [1, 3])
def test_means_are_the_exact_means_rounded_once(threads: int) -> None:
    contributions = _contributions(7, 301, seed=threads)
    sums = StreamingSum(threads=threads)
    assert sums.add_many(contributions) == [True] * 7
    for k, name in enumerate(("model", "control")):
        column = [terms[k] for terms in contributions]
        torch.testing.assert_close(sums.mean(name), _exact_mean(column), rtol=2**-23, atol=2**-60)
        assert sums.total(name) == sum(w for _, _, w in column)
    assert sums.names == ("model", "control") and sums.count == 7


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), parts=st.integers(1, 5))
def test_any_order_and_any_split_give_the_same_bits(seed: int, parts: int) -> None:
    contributions = _contributions(11, 257, seed=seed % 1000)
    whole = StreamingSum()
    whole.add_many(contributions)
    rng = random.Random(seed)
    order = list(range(len(contributions)))
    rng.shuffle(order)
    pieces = [StreamingSum() for _ in range(parts)]
    for i in order:
        pieces[rng.randrange(parts)].add(contributions[i])
    rng.shuffle(pieces)
    merged = StreamingSum()
    for piece in pieces:
        merged.merge(piece)
    assert merged.count == whole.count == 11
    for name in whole.names:
        assert torch.equal(merged.mean(name), whole.mean(name))
        assert torch.equal(merged.sum(name), whole.sum(name))
        assert merged.total(name) == whole.total(name)


def test_saved_sums_load_and_merge_to_the_same_bits(tmp_path: Path) -> None:
    contributions = _contributions(6, 1000, seed=3)
    whole = StreamingSum()
    whole.add_many(contributions)
    a, b = StreamingSum(), StreamingSum()
    a.add_many(contributions[:2])
    b.add_many(contributions[2:])
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    merged = StreamingSum.load(tmp_path / "b.safetensors")
    merged.merge(StreamingSum.load(tmp_path / "a.safetensors"))
    assert merged.names == whole.names and merged.count == 6
    for name in whole.names:
        assert torch.equal(merged.mean(name), whole.mean(name))
    # An empty sum saves and merges as nothing.
    StreamingSum().save(tmp_path / "empty.safetensors")
    merged.merge(StreamingSum.load(tmp_path / "empty.safetensors"))
    assert torch.equal(merged.mean("model"), whole.mean("model"))
    # Files that are not saved sums are refused.
    store.save(tmp_path / "other.safetensors", {"model": torch.zeros(3)})
    with pytest.raises(ValueError, match="no saved StreamingSum"):
        StreamingSum.load(tmp_path / "other.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError):
        StreamingSum.load(tmp_path / "cut.safetensors")


def test_merge_refuses_other_layouts() -> None:
    a, b = StreamingSum(), StreamingSum()
    a.add([("model", torch.ones(4), 1.0)])
    b.add([("other", torch.ones(4), 1.0)])
    with pytest.raises(ValueError, match="cannot merge terms"):
        a.merge(b)
    c = StreamingSum()
    c.add([("model", torch.ones(5), 1.0)])
    with pytest.raises(ValueError, match="cannot merge a sum of 5 values"):
        a.merge(c)
    with pytest.raises(TypeError, match="StreamingSum"):
        a.merge(aggregate.ExactSum(4))  # type: ignore[arg-type]
    assert a.count == 1 and torch.equal(a.mean("model"), torch.ones(4))


def test_nonfinite_contributions_are_refused_whole() -> None:
    contributions = _contributions(4, 999, seed=5)
    contributions[1][1][1][7] = float("nan")  # control of the second
    contributions[3][0][1][0] = float("-inf")  # model of the fourth

    raising = StreamingSum()
    with pytest.raises(
        aggregate.NonFiniteError, match=r"the control and model terms of contributions \['b', 'd'\]"
    ):
        raising.add_many(contributions, labels=["a", "b", "c", "d"])
    assert raising.count == 0 and raising.names == ()

    expected = StreamingSum()
    expected.add_many([contributions[0], contributions[2]])
    skipping = StreamingSum(nonfinite="skip", threads=2)
    folded = skipping.add_many(contributions, labels=[10, 11, 12, 13])
    assert folded == [True, False, True, False]
    assert skipping.skipped == [
        NonFiniteContribution(11, ("control",)),
        NonFiniteContribution(13, ("model",)),
    ]
    assert skipping.count == 2
    for name in expected.names:
        assert torch.equal(skipping.sum(name), expected.sum(name))
    assert skipping.totals == expected.totals
    # Labels default to the contribution's position.
    unnamed = StreamingSum(nonfinite="skip")
    unnamed.add(contributions[0])
    unnamed.add(contributions[1])
    assert unnamed.skipped == [NonFiniteContribution(1, ("control",))]


def test_out_of_range_terms_are_refused() -> None:
    sums = StreamingSum()
    sums.add([("model", torch.ones(4), 1.0)])
    # Refused in the first term: nothing was added, the sums stay usable.
    with pytest.raises(aggregate.OutOfRangeError):
        sums.add([("model", torch.full((4,), 3e38), 1.0)])
    assert sums.count == 1 and torch.equal(sums.mean("model"), torch.ones(4))
    # Refused after an earlier term went in: the sums are unusable from then on.
    two = StreamingSum()
    two.add([("a", torch.ones(2), 1.0), ("b", torch.ones(2), 1.0)])
    with pytest.raises(aggregate.OutOfRangeError):
        two.add([("a", torch.ones(2), 1.0), ("b", torch.full((2,), 3e38), 1.0)])
    with pytest.raises(RuntimeError, match="unusable"):
        two.add([("a", torch.ones(2), 1.0), ("b", torch.ones(2), 1.0)])


def test_errors() -> None:
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
    with pytest.raises(ValueError, match="nonfinite"):
        StreamingSum(nonfinite="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads must be positive"):
        StreamingSum(threads=0)
    # The failed calls folded nothing.
    assert sums.count == 1 and torch.equal(sums.sum("model"), torch.zeros(4))


def test_vectors_of_other_shapes_and_dtypes() -> None:
    sums = StreamingSum()
    sums.add([("w", torch.arange(6.0, dtype=torch.float64).view(2, 3), 2.0)])
    sums.add([("w", torch.ones(3, 2, dtype=torch.float16), 1.0)])
    sums.add([("w", torch.ones(6, dtype=torch.bfloat16), 1.0)])
    assert torch.equal(sums.sum("w"), torch.arange(6.0) * 2 + 2)
    assert torch.equal(sums.mean("w"), (torch.arange(6.0) * 2 + 2) / 4)
    # Uplinks (1-D float32, float16 or bfloat16 on the CPU) are read as they are.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        vector = torch.ones(4, dtype=dtype)
        assert flat_vector(vector) is vector
    assert flat_vector(torch.ones(2, 2, dtype=torch.float64)).dtype == torch.float32
