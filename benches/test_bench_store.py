"""pytest-benchmark suite for the store and the kernels (a report, not a pass/fail gate).

    python -m pytest benches/test_bench_store.py --benchmark-only

Each group pairs emberfl with the baseline it replaces, measured in the same run;
`benches/store_report.py` prints the full comparison table with ratios.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from emberfl import aggregate, store
from emberfl.models import create_model


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    return create_model("resnet18", (3, 32, 32), 10, seed=0).state_dict()


@pytest.fixture(scope="module")
def clients() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2_000_000, generator=g) for _ in range(20)]


def _read_all(tensors: dict[str, torch.Tensor]) -> float:
    return sum(float(t.float().sum()) for t in tensors.values() if t.numel())


@pytest.mark.benchmark(group="save resnet18")
def test_save_emberfl(
    benchmark: BenchmarkFixture, resnet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    benchmark(store.save, tmp_path / "m.safetensors", resnet_state)


@pytest.mark.benchmark(group="save resnet18")
def test_save_safetensors(
    benchmark: BenchmarkFixture, resnet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    benchmark(st.save_file, resnet_state, str(tmp_path / "m.safetensors"))


@pytest.mark.benchmark(group="load+read resnet18")
def test_load_emberfl(
    benchmark: BenchmarkFixture, resnet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "m.safetensors"
    store.save(path, resnet_state)
    benchmark(lambda: _read_all(store.load(path)))


@pytest.mark.benchmark(group="load+read resnet18")
def test_load_safetensors(
    benchmark: BenchmarkFixture, resnet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "m.safetensors"
    st.save_file(resnet_state, str(path))
    benchmark(lambda: _read_all(st.load_file(str(path))))


@pytest.mark.benchmark(group="weighted mean 20 x 2M")
@pytest.mark.parametrize("threads", [1, 2])
def test_mean_emberfl(
    benchmark: BenchmarkFixture, clients: list[torch.Tensor], threads: int
) -> None:
    out = torch.empty_like(clients[0])
    weights = [float(i + 1) for i in range(len(clients))]
    benchmark(aggregate.weighted_mean, clients, weights, out=out, threads=threads)


@pytest.mark.benchmark(group="weighted mean 20 x 2M")
def test_mean_torch_add_loop(benchmark: BenchmarkFixture, clients: list[torch.Tensor]) -> None:
    out = torch.empty_like(clients[0])
    weights = [float(i + 1) / 210.0 for i in range(len(clients))]

    def run() -> None:
        out.zero_()
        for w, x in zip(weights, clients, strict=True):
            out.add_(x, alpha=w)

    benchmark(run)
