"""FedAvg on the embedded digits data with emberfl's library API.

    python examples/quickstart-fedavg/main.py                  # 100 clients, 30 rounds
    python examples/quickstart-fedavg/main.py --rounds 2 --clients 4

The same steps as `emberfl run`, written out: load and partition the data, write it
to a memory-mapped dataset store, build the server handler and a process-pool
trainer, run the rounds, save the global model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from emberfl import store
from emberfl.contrib import FedAvgBaseServerHandler, FedAvgProcessPoolClientTrainer
from emberfl.core import ModelSelector
from emberfl.data import DatasetStore, StorePartitionedDataset, iid, load_digits
from emberfl.metrics import MetricsWriter, RoundMetrics
from emberfl.models import create_model


class DigitsModels(ModelSelector[str]):
    """Builds models for 8x8 digits; every model of a name starts from the same weights."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def select_model(self, model_name: str) -> nn.Module:
        return create_model(model_name, (1, 8, 8), 10, seed=self.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--sample-ratio", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("quickstart-run"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the workers train; this process only evaluates

    with tempfile.TemporaryDirectory(prefix="emberfl-quickstart-") as work:
        # 1. Data: 1,438 training images split IID among the clients, written once to a
        #    store that every worker maps (only its path travels to the workers).
        digits = load_digits(seed=args.seed)
        partition = iid(digits.train_y, args.clients, seed=args.seed)
        DatasetStore.create(
            Path(work) / "data",
            {"train": (digits.train_x, digits.train_y), "test": (digits.test_x, digits.test_y)},
            {"train": partition},
            mean=digits.mean,
            std=digits.std,
            scale=1.0,  # mean/std are in the units of the stored uint8 pixels
        )
        dataset = StorePartitionedDataset(Path(work) / "data")

        # 2. Server and clients, with BlazeFL's constructor arguments.
        models = DigitsModels(args.seed)
        server = FedAvgBaseServerHandler(
            models, "mlp", dataset, args.rounds, args.clients, args.sample_ratio,
            "cpu", 512, args.seed,
        )  # fmt: skip
        trainer = FedAvgProcessPoolClientTrainer(
            models, "mlp", Path(work) / "state", dataset, "cpu", args.clients, args.epochs,
            args.batch_size, args.lr, args.seed, args.workers, progress=False,
        )  # fmt: skip
        # Optional: each worker folds its clients' models into its own exact sum; the
        # server merges one sum per worker instead of reading every client's model.
        trainer.uplink_fold = server.uplink_fold()

        # 3. Rounds: sample, send the global model, train, aggregate, evaluate.
        print(f"{'round':>5}  {'accuracy':>8}  {'loss':>7}  {'seconds':>7}")
        with trainer, MetricsWriter(args.out, tensorboard=False) as writer:
            while not server.is_stopped():
                start = time.perf_counter()
                clients = server.sample_clients()
                trainer.local_process(server.downlink_package(), clients)
                for package in trainer.uplink_package():
                    server.load(package)
                summary = server.get_summary()
                seconds = time.perf_counter() - start
                writer.write(
                    RoundMetrics(
                        round=server.round,
                        accuracy=summary["server_acc"],
                        loss=summary["server_loss"],
                        round_seconds=seconds,
                        num_clients=len(clients),
                    )
                )
                print(
                    f"{server.round:>5}  {summary['server_acc']:>8.4f}  "
                    f"{summary['server_loss']:>7.4f}  {seconds:>7.2f}"
                )

    # 4. The final global model, readable with emberfl.store.load / load_model.
    store.save_model(server.model, args.out / "model.safetensors")
    print(f"final accuracy: {summary['server_acc']:.4f} (model in {args.out})")


if __name__ == "__main__":  # worker processes import this file; they must not run main()
    main()
