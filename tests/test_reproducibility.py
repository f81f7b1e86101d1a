"""Seeding, per-client streams, snapshots and generator-state tensors."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from emberfl import store
from emberfl.reproducibility import (
    RandomStateSnapshot,
    RNGSuite,
    client_rng_suite,
    client_seed,
    create_rng_suite,
    restore_rng_suite,
    rng_suite_state,
    seed_client,
    seed_everything,
    setup_reproducibility,
)


def draws(suite: RNGSuite) -> tuple[list[float], list[float], list[float]]:
    """A few values from each generator of ``suite``."""
    return (
        [suite.python.random() for _ in range(3)],
        suite.numpy.random(3).tolist(),
        torch.rand(3, generator=suite.torch_cpu).tolist(),
    )


def global_draws() -> tuple[list[float], list[float], list[float]]:
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let tests change PYTHONHASHSEED and the cuDNN flags without leaking."""
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    state = RandomStateSnapshot.capture()
    yield
    RandomStateSnapshot.restore(state)


# --- client_seed ---------------------------------------------------------------------


def test_client_seed_is_deterministic_63_bit_and_distinct() -> None:
    triples = list(itertools.product(range(4), range(40), range(8)))
    seeds = [client_seed(*t) for t in triples]
    assert seeds == [client_seed(*t) for t in triples]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(triples)
    # Permuted triples are different streams too.
    assert len({client_seed(*p) for p in itertools.permutations((1, 2, 3))}) == 6
    # Large values at the edge of the accepted range.
    top = 2**32 - 1
    assert len({client_seed(top, 0, 0), client_seed(0, top, 0), client_seed(0, 0, top)}) == 3


def test_client_seed_comes_from_seed_sequence() -> None:
    word = np.random.SeedSequence([7, 11, 13]).generate_state(1, dtype=np.uint64)[0]
    assert client_seed(7, 11, 13) == int(word) & (2**63 - 1)


def test_client_seed_is_the_same_in_a_fresh_interpreter() -> None:
    code = "from emberfl.reproducibility import client_seed; print(client_seed(3, 17, 5))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert int(out.stdout.strip()) == client_seed(3, 17, 5)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1, 0, 0), ValueError),
        ((0, -1, 0), ValueError),
        ((0, 0, 2**32), ValueError),
        ((2**32, 0, 0), ValueError),
        ((0, 1.0, 0), TypeError),
        ((True, 0, 0), TypeError),
        (("1", 0, 0), TypeError),
    ],
)
def test_client_seed_rejects_bad_input(args: tuple[object, object, object], error: type) -> None:
    with pytest.raises(error, match=r"seed|cid|round"):
        client_seed(*args)  # type: ignore[arg-type]


def test_client_seed_accepts_numpy_integers() -> None:
    assert client_seed(np.int64(1), np.uint32(2), np.int8(3)) == client_seed(1, 2, 3)


# --- client suites and global seeding ---------------------------------------------------


def test_client_rng_suite_repeats_for_a_triple_and_differs_between_triples() -> None:
    first = draws(client_rng_suite(1, 5, 2))
    assert draws(client_rng_suite(1, 5, 2)) == first
    for other in [(2, 5, 2), (1, 6, 2), (1, 5, 3)]:
        d = draws(client_rng_suite(*other))
        for a, b in zip(first, d, strict=True):
            assert a != b


def test_seed_client_seeds_all_global_generators(clean_env: None) -> None:
    seed_client(9, 4, 1)
    first = global_draws()
    seed_client(9, 4, 1)
    assert global_draws() == first
    seed_client(9, 4, 2)
    other = global_draws()
    for a, b in zip(first, other, strict=True):
        assert a != b
    # Python's and torch's global streams are those of the client's suite.
    seed_client(9, 4, 1)
    suite = client_rng_suite(9, 4, 1)
    assert random.random() == suite.python.random()
    assert torch.equal(torch.rand(4), torch.rand(4, generator=suite.torch_cpu))


def test_seed_client_uses_all_63_bits_for_numpy(clean_env: None) -> None:
    s = client_seed(0, 0, 0)
    seed_client(0, 0, 0)
    got = np.random.rand(4)
    # Seeding with the low 32 bits alone would give a different stream.
    assert not np.array_equal(got, np.random.RandomState(s & 0xFFFFFFFF).rand(4))
    words = np.array([s & 0xFFFFFFFF, s >> 32], dtype=np.uint32)
    assert np.array_equal(got, np.random.RandomState(words).rand(4))


def test_create_rng_suite_matches_seeded_generators() -> None:
    suite = create_rng_suite(42)
    assert suite.python.random() == random.Random(42).random()
    assert suite.numpy.random() == np.random.default_rng(42).random()
    assert torch.equal(
        torch.rand(3, generator=suite.torch_cpu),
        torch.rand(3, generator=torch.Generator().manual_seed(42)),
    )
    assert (suite.torch_cuda is not None) == torch.cuda.is_available()
    with pytest.raises(ValueError, match="seed"):
        create_rng_suite(-3)


def test_seed_everything_matches_blazefl_semantics(clean_env: None) -> None:
    seed_everything(123)
    assert os.environ["PYTHONHASHSEED"] == "123"
    assert torch.backends.cudnn.deterministic is True
    assert torch.backends.cudnn.benchmark is False
    py, nump, tor = global_draws()
    reference = random.Random(123)
    assert py == [reference.random() for _ in range(3)]
    assert nump == np.random.RandomState(123).rand(3).tolist()
    assert tor == torch.rand(3, generator=torch.Generator().manual_seed(123)).tolist()
    with pytest.raises(ValueError, match="2\\*\\*32"):
        seed_everything(2**32)


def test_setup_reproducibility_sets_environment(clean_env: None) -> None:
    torch.backends.cudnn.benchmark = True
    setup_reproducibility(7)
    assert os.environ["PYTHONHASHSEED"] == "7"
    assert torch.backends.cudnn.deterministic is True
    assert torch.backends.cudnn.benchmark is False


# --- snapshots ----------------------------------------------------------------------


def test_snapshot_round_trips(clean_env: None) -> None:
    seed_everything(5)
    global_draws()
    snap = RandomStateSnapshot.capture()
    key_before = snap.numpy[1].copy()
    expected = global_draws()
    assert np.array_equal(snap.numpy[1], key_before), "snapshot must not follow later draws"
    os.environ["PYTHONHASHSEED"] = "999"
    RandomStateSnapshot.restore(snap)
    assert global_draws() == expected
    assert os.environ["PYTHONHASHSEED"] == "5"


def test_snapshot_without_pythonhashseed(clean_env: None) -> None:
    assert "PYTHONHASHSEED" not in os.environ
    snap = RandomStateSnapshot.capture()
    assert snap.environ == ""
    expected = global_draws()
    os.environ["PYTHONHASHSEED"] = "1"
    RandomStateSnapshot.restore(snap)
    assert "PYTHONHASHSEED" not in os.environ
    assert global_draws() == expected


def test_snapshot_keeps_cached_gaussian(clean_env: None) -> None:
    np.random.seed(3)
    np.random.standard_normal()  # leaves the second Box-Muller value cached
    snap = RandomStateSnapshot.capture()
    assert snap.numpy[3] == 1
    expected = np.random.standard_normal(3)
    RandomStateSnapshot.restore(snap)
    assert np.array_equal(np.random.standard_normal(3), expected)


# --- generator states as tensors -----------------------------------------------------------


def test_rng_suite_state_round_trips_and_continues_streams() -> None:
    suite = client_rng_suite(1, 2, 3)
    draws(suite)
    suite.python.gauss(0.0, 1.0)  # caches gauss_next
    state = rng_suite_state(suite)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    assert state["python.gauss_next"].numel() == 1
    restored = restore_rng_suite(state)
    assert restored.python.gauss(0.0, 1.0) == suite.python.gauss(0.0, 1.0)
    assert draws(restored) == draws(suite)
    # The captured state is a copy: drawing from the suite did not change it.
    again = restore_rng_suite(state)
    assert draws(again) != draws(suite)


def test_rng_suite_state_survives_a_store_file(tmp_path: Path) -> None:
    path = tmp_path / "rng.safetensors"
    suites = {cid: client_rng_suite(0, cid, 4) for cid in range(3)}
    for s in suites.values():
        draws(s)
    tensors: dict[str, torch.Tensor] = {}
    for cid, s in suites.items():
        tensors.update(rng_suite_state(s, prefix=f"client{cid}/"))
    store.save(path, tensors)
    loaded = store.load(path)
    for cid, s in suites.items():
        assert draws(restore_rng_suite(loaded, prefix=f"client{cid}/")) == draws(s)


@pytest.mark.parametrize("bit_generator", [np.random.MT19937, np.random.Philox, np.random.SFC64])
def test_rng_suite_state_handles_other_numpy_bit_generators(bit_generator: type) -> None:
    suite = create_rng_suite(8)
    suite.numpy = np.random.Generator(bit_generator(8))
    suite.numpy.random(5)
    restored = restore_rng_suite(rng_suite_state(suite))
    assert type(restored.numpy.bit_generator) is bit_generator
    assert np.array_equal(restored.numpy.random(7), suite.numpy.random(7))


def test_restore_rng_suite_rejects_bad_state() -> None:
    state = rng_suite_state(create_rng_suite(1))
    missing = dict(state)
    del missing["numpy.state"]
    with pytest.raises(KeyError, match=r"numpy\.state"):
        restore_rng_suite(missing)
    bad = dict(state)
    bad["numpy.state"] = torch.frombuffer(
        bytearray(b'{"bit_generator": "Nope"}'), dtype=torch.uint8
    )
    with pytest.raises(ValueError, match="Nope"):
        restore_rng_suite(bad)
    with pytest.raises(KeyError, match=r"other/python\.state"):
        restore_rng_suite(state, prefix="other/")
    with pytest.raises(TypeError, match="RNGSuite"):
        rng_suite_state("not a suite")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_restore_rng_suite_needs_cuda_for_a_cuda_state() -> None:
    state = rng_suite_state(create_rng_suite(1))
    state["torch_cuda.state"] = state["torch_cpu.state"]
    state["torch_cuda.device"] = torch.tensor([0])
    with pytest.raises(RuntimeError, match="CUDA"):
        restore_rng_suite(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_state_round_trips() -> None:
    suite = client_rng_suite(2, 3, 4)
    assert suite.torch_cuda is not None
    torch.rand(10, device="cuda", generator=suite.torch_cuda)
    restored = restore_rng_suite(rng_suite_state(suite))
    assert restored.torch_cuda is not None
    assert torch.equal(
        torch.rand(10, device="cuda", generator=restored.torch_cuda),
        torch.rand(10, device="cuda", generator=suite.torch_cuda),
    )
