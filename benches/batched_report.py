"""Batched runtime report: K clients trained as one model against the per-client pools.

One FedAvg round's client training (the same clients, data, seed and settings for every
row), timed as a steady round (the mean of rounds 2..R, after a first warm-up round):

``process``  FedAvgProcessPoolClientTrainer, ``--workers`` processes, 1 torch thread each
``thread``   FedAvgThreadPoolClientTrainer, ``--workers`` threads, 1 torch thread each
``batched``  FedAvgBatchedClientTrainer: the round's clients in groups of ``--batch-clients``,
             in this process with ``--workers`` torch threads

Workloads (``--workloads``):

``2nn``        McMahan et al.'s 2NN (784-200-200-10) on MNIST-shaped data, 100 clients of
               600 samples, C=0.1, E=1, B=10 (real MNIST when ``EMBERFL_MNIST_DIR`` is set,
               else random 28x28 images with the same shapes: the cost is the same)
``digits``     the quick start: the MLP on the digits data, 100 clients, C=0.1, E=5, B=10
``cifar_cnn``  the PyTorch tutorial CNN on CIFAR-shaped random images, 100 clients of 500
               samples, C=0.1, E=1, B=50
``resnet18``   the CIFAR ResNet-18 on the same data and settings (``--runtimes
               process,thread``: it has BatchNorm, which the batched runtime refuses)

``--device cuda`` runs every runtime on the GPU (the pools spread their clients over the
visible devices). Each row is the median of ``--repeat`` runs (fresh trainers, rotating
order); the ratio is the best pool's steady round over the batched runtime's (above 1:
batched is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emberfl.contrib import (
    FedAvgBaseServerHandler,
    FedAvgBatchedClientTrainer,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
)
from emberfl.data import Dataset, iid, load_dataset, load_digits
from emberfl.models import ZooModelSelector
from emberfl.simulation import write_store

RUNTIMES = ("process", "thread", "batched")


def _random_images(name: str, n: int, shape: tuple[int, ...], classes: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(
        name=name,
        train_x=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
        train_y=rng.integers(0, classes, n).astype(np.int64),
        test_x=rng.integers(0, 256, (100, *shape), dtype=np.uint8),
        test_y=rng.integers(0, classes, 100).astype(np.int64),
        num_classes=classes,
        in_shape=shape,
        mean=(127.5,) * shape[0],
        std=(73.9,) * shape[0],
    )


def workload(name: str, seed: int) -> tuple[Dataset, str, int, int, int, float]:
    """(data, model, clients, epochs, batch size, lr) of workload ``name``."""
    if name == "2nn":
        mnist = os.environ.get("EMBERFL_MNIST_DIR")
        data = (
            load_dataset("mnist", Path(mnist), seed)
            if mnist
            else _random_images("mnist-shaped", 60_000, (1, 28, 28), 10, seed)
        )
        return data, "2nn", 100, 1, 10, 0.1
    if name == "digits":
        return load_digits(seed=seed), "mlp", 100, 5, 10, 0.2
    if name in ("cifar_cnn", "resnet18"):  # resnet18 has BatchNorm: the pools only
        images = _random_images("cifar-shaped", 50_000, (3, 32, 32), 10, seed)
        return images, name, 100, 1, 50, 0.05
    raise ValueError(f"unknown workload {name!r}")


def run(args: argparse.Namespace, name: str, runtime: str, work: Path) -> float:
    data, model, clients, epochs, batch, lr = workload(name, args.seed)
    store = work / f"{name}-store"
    if not store.exists():
        write_store(store, data, iid(data.train_y, clients, args.seed))
    from emberfl.data import StorePartitionedDataset

    dataset = StorePartitionedDataset(store)
    selector = ZooModelSelector(data.in_shape, data.num_classes, args.seed)
    dev = args.device
    handler = FedAvgBaseServerHandler(
        selector, model, dataset, args.rounds, clients, 0.1, dev, 512, args.seed
    )
    common = (selector, model, dataset, dev, clients, epochs, batch, lr, args.seed)
    trainer: Any
    threads = torch.get_num_threads()
    if runtime == "process":
        trainer = FedAvgProcessPoolClientTrainer(
            selector, model, work / "state", dataset, dev, clients, epochs, batch, lr,
            args.seed, args.workers, progress=False, share_dir=work, torch_threads=1,
        )  # fmt: skip
    elif runtime == "thread":
        torch.set_num_threads(1)
        trainer = FedAvgThreadPoolClientTrainer(*common, args.workers, progress=False)
    else:
        torch.set_num_threads(args.workers)
        trainer = FedAvgBatchedClientTrainer(
            *common, batch_clients=args.batch_clients, progress=False
        )
    trainer.uplink_fold = handler.uplink_fold()
    times = []
    try:
        while not handler.is_stopped():
            start = time.perf_counter()
            trainer.local_process(handler.downlink_package(), handler.sample_clients())
            for package in trainer.uplink_package():
                handler.load(package)
            times.append(time.perf_counter() - start)
    finally:
        close = getattr(trainer, "close", None)
        if close is not None:
            close()
        torch.set_num_threads(threads)
    later = times[1:] or times
    return sum(later) / len(later)


def main(argv: list[str] | None = None) -> dict[tuple[str, str], float]:
    """Run the report; returns the median steady round per (workload, runtime)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="2nn,digits,cifar_cnn")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    runtimes = args.runtimes.split(",")
    print(
        f"# {args.rounds} rounds (steady = rounds 2..), {args.repeat} runs each, "
        f"{args.workers} workers, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"batch clients {args.batch_clients}, device {args.device}",
        flush=True,
    )
    print(f"{'workload':10} {'runtime':8} {'steady s':>9} {'best pool / batched':>20}")
    table: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="emberfl-batched-") as tmp:
        for name in args.workloads.split(","):
            results: dict[str, list[float]] = {r: [] for r in runtimes}
            for rep in range(args.repeat):
                for r in runtimes[rep % len(runtimes) :] + runtimes[: rep % len(runtimes)]:
                    results[r].append(run(args, name, r, Path(tmp)))
            medians = {r: statistics.median(v) for r, v in results.items()}
            pools = [medians[r] for r in ("process", "thread") if r in medians]
            for r, m in medians.items():
                table[(name, r)] = m
                ratio = f"{min(pools) / m:.2f}" if r == "batched" and pools else ""
                print(f"{name:10} {r:8} {m:9.3f} {ratio:>20}", flush=True)
    return table


if __name__ == "__main__":
    main()
