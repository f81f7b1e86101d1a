"""DS-FL (Itahara et al. 2021): federated distillation with entropy-reduced aggregation.

    python examples/step-by-step-dsfl/main.py                       # 10 clients, 20 rounds
    python examples/step-by-step-dsfl/main.py --rounds 2 --clients 4

Clients never exchange model weights. Every round each client predicts soft labels
(class probabilities) for a sample of a shared, *unlabelled* open data set; the server
averages them, sharpens the average with a low-temperature softmax (entropy-reduced
aggregation, ERA) and sends the result back; clients and server then learn from
those labels by distillation. See README.md in this directory for the walk-through.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emberfl import aggregate, store
from emberfl.contrib import ClientStateStore, evaluate_loader, local_sgd, sgd_step
from emberfl.core import (
    BaseServerHandler,
    ModelSelector,
    ProcessPoolClientTrainer,
    current_client,
)
from emberfl.data import DatasetStore, StorePartitionedDataset, dirichlet, load_digits
from emberfl.metrics import MetricsWriter, RoundMetrics
from emberfl.models import create_model
from emberfl.reproducibility import create_rng_suite

# --------------------------------------------------------------------------- step 1: data


def build_data(root: Path, clients: int, open_fraction: float, alpha: float, seed: int) -> int:
    """Private labelled data per client, a shared unlabelled open set, a test set.

    Returns the size of the open set.
    """
    digits = load_digits(seed=seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(digits.num_train)
    n_open = int(open_fraction * digits.num_train)
    open_idx, private_idx = np.sort(order[:n_open]), np.sort(order[n_open:])
    private_y = digits.train_y[private_idx]
    partition = dirichlet(private_y, clients, alpha, seed=seed)  # label-skewed clients
    DatasetStore.create(
        root,
        {
            "train": (digits.train_x[private_idx], private_y),
            # Unlabelled: the store wants a label column, nobody reads it.
            "open": (digits.train_x[open_idx], np.zeros(n_open, dtype=np.int64)),
            "test": (digits.test_x, digits.test_y),
        },
        {"train": partition},
        mean=digits.mean,
        std=digits.std,
        scale=1.0,
    )
    return n_open


class DigitsModels(ModelSelector[str]):
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def select_model(self, model_name: str) -> nn.Module:
        return create_model(model_name, (1, 8, 8), 10, seed=self.seed)


# ----------------------------------------------------------------------- step 2: packages


@dataclass
class DSFLDownlinkPackage:
    """The global soft labels of last round's open sample, and this round's sample."""

    soft_labels: torch.Tensor | None  # [len(indices), classes]; None in round 1
    indices: torch.Tensor | None
    next_indices: torch.Tensor


@dataclass
class DSFLUplinkPackage:
    """A client's soft labels for ``DSFLDownlinkPackage.next_indices``."""

    cid: int
    soft_labels: torch.Tensor
    data_size: int
    metadata: dict[str, float]


# ------------------------------------------------------------------ step 3: distillation


def distill(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> None:
    """Fit ``model`` to the soft labels ``targets`` (KL divergence), minibatch SGD.

    ``sgd_step`` is ``torch.optim.SGD``'s plain step; building a ``torch.optim``
    optimizer would import torch's compiler stack, seconds in every worker process.
    """
    model.train()
    params = list(model.parameters())
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, inputs.shape[0], batch_size):
            batch = order[start : start + batch_size]
            log_probs = F.log_softmax(model(inputs[batch]), dim=1)
            loss = F.kl_div(log_probs, targets[batch], reduction="batchmean")
            model.zero_grad()
            loss.backward()
            sgd_step(params, lr)


def era(mean_soft_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy-reduced aggregation: a softmax of the averaged probabilities at a low
    temperature, which sharpens them (lower entropy) without changing their argmax."""
    return torch.softmax(mean_soft_labels / temperature, dim=1)


def mean_entropy(probs: torch.Tensor) -> float:
    return float(-(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean())


# ------------------------------------------------------------------ step 4: server handler


class DSFLServerHandler(BaseServerHandler[DSFLUplinkPackage, DSFLDownlinkPackage]):
    def __init__(
        self,
        models: ModelSelector[str],
        model_name: str,
        dataset: StorePartitionedDataset,
        rounds: int,
        num_clients: int,
        sample_ratio: float,
        open_size: int,
        open_per_round: int,
        temperature: float,
        distill_epochs: int,
        lr: float,
        seed: int,
    ) -> None:
        self.model = models.select_model(model_name)
        self.dataset = dataset
        self.rounds = rounds
        self.num_clients = num_clients
        self.per_round = max(1, int(num_clients * sample_ratio))
        self.open_size = open_size
        self.open_per_round = min(open_per_round, open_size)
        self.temperature = temperature
        self.distill_epochs = distill_epochs
        self.lr = lr
        self.round = 0
        self.rng = create_rng_suite(seed)
        self.buffer: list[DSFLUplinkPackage] = []
        self.soft_labels: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None
        self.next_indices = self._draw_indices()
        self.entropy = (math.nan, math.nan)

    def _draw_indices(self) -> torch.Tensor:
        perm = torch.randperm(self.open_size, generator=self.rng.torch_cpu)
        return perm[: self.open_per_round].sort().values

    def sample_clients(self) -> list[int]:
        return sorted(self.rng.python.sample(range(self.num_clients), self.per_round))

    def is_stopped(self) -> bool:
        return self.round >= self.rounds

    def downlink_package(self) -> DSFLDownlinkPackage:
        return DSFLDownlinkPackage(self.soft_labels, self.indices, self.next_indices)

    def load(self, payload: DSFLUplinkPackage) -> bool:
        self.buffer.append(payload)
        if len(self.buffer) < self.per_round:
            return False
        self.global_update(self.buffer)
        self.buffer = []
        self.round += 1
        return True

    def global_update(self, buffer: list[DSFLUplinkPackage]) -> None:
        # The clients' soft labels are flat float32 vectors once viewed as such; the
        # Rust kernel averages them (weighted by private data size) where they lie.
        shape = buffer[0].soft_labels.shape
        mean = aggregate.weighted_mean(
            [p.soft_labels.reshape(-1) for p in buffer], [p.data_size for p in buffer]
        )
        assert isinstance(mean, torch.Tensor)
        averaged = mean.view(shape)
        sharpened = era(averaged, self.temperature)
        self.entropy = (mean_entropy(averaged), mean_entropy(sharpened))
        # The server model learns from the open data and the global labels too; it is
        # the model evaluated on the test set.
        open_x, _ = self.dataset.store.dataset("open").get_batch(self.next_indices)
        distill(
            self.model,
            open_x,
            sharpened,
            self.distill_epochs,
            32,
            self.lr,
            self.rng.torch_cpu,
        )
        self.soft_labels, self.indices = sharpened, self.next_indices
        self.next_indices = self._draw_indices()

    def evaluate(self) -> tuple[float, float]:
        loader = self.dataset.get_dataloader("test", None, 512, torch.Generator())
        return evaluate_loader(self.model, loader, "cpu")


# ---------------------------------------------------------------- step 5: client trainer


@dataclass
class DSFLClientConfig:
    models: ModelSelector[str]
    model_name: str
    dataset: StorePartitionedDataset
    state_dir: Path
    cid: int
    epochs: int
    distill_epochs: int
    batch_size: int
    lr: float


class DSFLProcessPoolClientTrainer(
    ProcessPoolClientTrainer[
        DSFLUplinkPackage, DSFLDownlinkPackage, DSFLClientConfig, DSFLUplinkPackage
    ]
):
    def __init__(
        self,
        models: ModelSelector[str],
        model_name: str,
        dataset: StorePartitionedDataset,
        state_dir: Path,
        epochs: int,
        distill_epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        num_parallels: int,
    ) -> None:
        # What the process-pool runtime reads:
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[DSFLUplinkPackage] = []
        self.stop_event = threading.Event()
        self.seed = seed
        self.progress = False
        # What our clients need:
        self.models = models
        self.model_name = model_name
        self.dataset = dataset
        self.state_dir = state_dir
        self.epochs = epochs
        self.distill_epochs = distill_epochs
        self.batch_size = batch_size
        self.lr = lr

    def get_client_config(self, cid: int) -> DSFLClientConfig:
        return DSFLClientConfig(
            self.models,
            self.model_name,
            self.dataset,
            self.state_dir,
            cid,
            self.epochs,
            self.distill_epochs,
            self.batch_size,
            self.lr,
        )

    @staticmethod
    def worker(
        config: DSFLClientConfig,
        payload: DSFLDownlinkPackage,
        device: str,
        stop_event: Any,
        *,
        shm_buffer: DSFLUplinkPackage | None = None,
    ) -> DSFLUplinkPackage:
        start = time.perf_counter()
        generator = current_client().rng.torch_cpu  # this client's stream for this round
        # Each client keeps its own model between rounds, on disk.
        states = ClientStateStore(config.state_dir)
        model = config.models.select_model(config.model_name)
        saved = states.load(config.cid)
        if saved is not None:
            model.load_state_dict(saved)
        open_set = config.dataset.store.dataset("open")

        # (a) Learn from last round's global soft labels on the open data.
        if payload.soft_labels is not None and payload.indices is not None:
            open_x, _ = open_set.get_batch(payload.indices)
            distill(
                model,
                open_x,
                payload.soft_labels,
                config.distill_epochs,
                config.batch_size,
                config.lr,
                generator,
            )
        # (b) Learn from the private labelled data: FedAvg's local SGD loop.
        loader = config.dataset.get_dataloader("train", config.cid, config.batch_size, generator)
        local = local_sgd(model, loader, device, config.epochs, config.lr, stop_event)
        # (c) Predict soft labels for this round's open sample.
        model.eval()
        with torch.no_grad():
            next_x, _ = open_set.get_batch(payload.next_indices)
            soft = torch.softmax(model(next_x), dim=1)
        states.save(config.cid, model.state_dict())
        return DSFLUplinkPackage(
            cid=config.cid,
            soft_labels=soft,
            data_size=len(loader.dataset),  # type: ignore[arg-type]
            metadata={"loss": local.loss, "train_seconds": time.perf_counter() - start},
        )


# ------------------------------------------------------------------------- step 6: run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--sample-ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs on private data")
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--open-fraction", type=float, default=0.3)
    parser.add_argument("--open-per-round", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.1, help="ERA temperature")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("dsfl-run"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="emberfl-dsfl-") as work:
        n_open = build_data(
            Path(work) / "data", args.clients, args.open_fraction, args.alpha, args.seed
        )
        dataset = StorePartitionedDataset(Path(work) / "data")
        models = DigitsModels(args.seed)
        server = DSFLServerHandler(
            models, "mlp", dataset, args.rounds, args.clients, args.sample_ratio, n_open,
            args.open_per_round, args.temperature, args.distill_epochs, args.lr, args.seed,
        )  # fmt: skip
        trainer = DSFLProcessPoolClientTrainer(
            models, "mlp", dataset, Path(work) / "clients", args.epochs, args.distill_epochs,
            args.batch_size, args.lr, args.seed, args.workers,
        )  # fmt: skip
        print(f"{'round':>5}  {'accuracy':>8}  {'entropy avg->ERA':>16}  {'bytes up':>8}")
        with trainer, MetricsWriter(args.out, tensorboard=False) as writer:
            while not server.is_stopped():
                start = time.perf_counter()
                clients = server.sample_clients()
                trainer.local_process(server.downlink_package(), clients)
                uplinks = trainer.uplink_package()
                bytes_up = sum(p.soft_labels.numel() * 4 for p in uplinks)
                for package in uplinks:
                    server.load(package)
                loss, acc = server.evaluate()
                before, after = server.entropy
                writer.write(
                    RoundMetrics(
                        round=server.round,
                        accuracy=acc,
                        loss=loss,
                        round_seconds=time.perf_counter() - start,
                        bytes_up=bytes_up,
                        num_clients=len(clients),
                        extra={"entropy_avg": before, "entropy_era": after},
                    )
                )
                entropy = f"{before:.3f} -> {after:.3f}"
                print(f"{server.round:>5}  {acc:>8.4f}  {entropy:>16}  {bytes_up:>8}")
    store.save_model(server.model, args.out / "server_model.safetensors")
    print(f"final server accuracy: {acc:.4f} (metrics in {args.out / 'metrics.csv'})")


if __name__ == "__main__":  # worker processes import this file; they must not run main()
    main()
