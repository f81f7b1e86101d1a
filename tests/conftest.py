"""Fixtures shared by the test modules.

Real MNIST is read from the directory in ``EMBERFL_MNIST_DIR`` (IDX files, ``.gz`` or
not); ``.ci/run`` points it at the project's shared data. Where it is unset the tests
that need the real data skip with one line saying so; the loaders and partitioners
keep tests of their own on small files the tests write themselves.

The random delays and choices of the fault and timing tests come from one seed,
``EMBERFL_TEST_SEED`` (default 7; the ``test_seed`` fixture). The pytest header shows
it, and so does the report of a failed test that used it, so a failure can be replayed
(``EMBERFL_TEST_SEED=<n> python -m pytest <test>``) or other draws tried.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
import torch

from emberfl import store
from emberfl.data import StorePartitionedDataset, iid, load_digits
from emberfl.models import ZooModelSelector
from emberfl.simulation import write_store

MNIST_ENV = "EMBERFL_MNIST_DIR"
SEED_ENV = "EMBERFL_TEST_SEED"
DEFAULT_TEST_SEED = 7
#: Clients of the ``digits`` fixture's federation.
DIGITS_CLIENTS = 6


def _test_seed() -> int:
    """The seed of the tests' random delays and choices: ``EMBERFL_TEST_SEED`` or 7."""
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return DEFAULT_TEST_SEED
    try:
        return int(raw)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={raw!r} is not an integer") from None


def pytest_report_header(config: pytest.Config) -> str:
    return f"{SEED_ENV}={_test_seed()} (seed of the fault tests' random delays and choices)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that drew from ``test_seed`` names the seed that replays it."""
    report = yield
    if report.failed and "test_seed" in getattr(item, "fixturenames", ()):
        report.sections.append(("seed", f"{SEED_ENV}={_test_seed()} replays this test"))
    return report


@pytest.fixture(scope="session")
def test_seed() -> int:
    """The seed for a test's random delays and choices (``EMBERFL_TEST_SEED``, default 7)."""
    return _test_seed()


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count after each test (runs change it)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test. Bitwise comparisons need the same intra-op thread
    count on every path (reductions split over threads round differently), and one thread
    keeps tiny models from oversubscribing a busy machine. Modules that compare bits use
    it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST directory, or a skip naming the variable to set."""
    where = os.environ.get(MNIST_ENV)
    if not where:
        pytest.skip(f"set {MNIST_ENV} to a directory of the MNIST IDX files to run this")
    path = Path(where)
    if not path.is_dir():
        pytest.fail(f"{MNIST_ENV}={where} is not a directory")
    return path


def _model_bytes(run_dir: Path) -> dict[str, bytes]:
    tensors = store.load(run_dir / "model.safetensors")
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in tensors.items()}


@pytest.fixture
def model_bytes() -> Callable[[Path], dict[str, bytes]]:
    """``model_bytes(run_dir)``: the final model of a run as raw bytes per tensor, for
    bitwise comparisons of runs (a resumed one against an uninterrupted one)."""
    return _model_bytes


@pytest.fixture(scope="session")
def digits(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[StorePartitionedDataset, ZooModelSelector]:
    """scikit-learn's digits split IID over ``DIGITS_CLIENTS`` clients in a store, and
    a model selector for them: a federation small enough for bitwise run comparisons."""
    data = load_digits(seed=0)
    written = write_store(
        tmp_path_factory.mktemp("digits") / "store", data, iid(data.train_y, DIGITS_CLIENTS, 0)
    )
    return written, ZooModelSelector(data.in_shape, data.num_classes, seed=0)
