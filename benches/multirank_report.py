"""Multi-rank report: the e2e workloads on ranks of a torch.distributed job (gloo).

The same work as ``e2e_report.py``'s ``emberfl-process`` row (FedAvg, CIFAR-10-shaped
synthetic data, every client in every round, folded where the clients train), run two
ways on the same cores:

``1 rank x W``  one process with a process pool of ``--workers`` workers;
``R ranks x 1`` ``R = --workers`` ranks (RANK / WORLD_SIZE / MASTER_ADDR, as torchrun
                starts them, gloo over loopback), each a process pool of one worker,
                wrapped in :class:`~emberfl.distributed.trainer.DistributedClientTrainer`.

Both end with the same model, bit for bit (checked here). A row gives the median steady
round of ``--repeat`` alternating runs, their ratio, and what a round moves between the
ranks (the model out, each rank's exact sums and its clients' stand-ins in:
``round_wire_bytes``).

Then a projection (a formula applied to the measured numbers, not a measurement) for
``--cohort`` clients per round on N nodes of ``--workers`` workers each, on 10 and
100 Gb/s links::

    round(N) = t_client * cohort / (N * workers)                    # training, split evenly
             + ceil(log2 N) * (B_model + B_sums) / link             # broadcast, tree of sums
             + cohort * b_meta / link                               # stand-ins into rank 0

with ``t_client`` the measured steady round of one rank divided by its clients per
worker, ``B_model`` the model's bytes, ``B_sums`` one rank's exact sums (16 bytes per
parameter: one 128-bit integer each), both taken once per level of a binomial tree
(the sums' tree is :func:`~emberfl.distributed.collectives.combine_sums`; the broadcast is
torch's, at most that), and ``b_meta`` a client's stand-in (measured, a few hundred
bytes). Latency, the store's meetings and rank 0's own work are left out.

    python benches/multirank_report.py --models cnn,resnet18 --clients 20 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_report import (
    IN_SHAPE,
    MODELS,
    NUM_CLASSES,
    EmberProcessTrainer,
    Setup,
    initial_params,
    make_data,
)
from emberfl.core import FoldTerm, UplinkFold
from emberfl.distributed.trainer import DistributedClientTrainer
from emberfl.models import create_model


def child_main(args: argparse.Namespace) -> None:
    """One run: a 1-rank pool of ``--workers``, or this rank of ``WORLD_SIZE`` ranks."""
    setup = Setup(args.data, MODELS[args.model], args.regime, args.samples, 50, 0.1, 0)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    workers = 1 if ranks > 1 else args.workers
    local = EmberProcessTrainer(setup, workers, "spawn")
    local.torch_threads = 1  # as the one rank's workers: the same bits either way
    trainer: Any = local
    if ranks > 1:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo")
        trainer = DistributedClientTrainer(local)
    means: list[torch.Tensor] = []
    trainer.uplink_fold = UplinkFold(
        (FoldTerm("params", "params", "n"),), sink=lambda r: means.append(r.sums.mean("params"))
    )
    times, wire = [], []
    try:
        if ranks > 1 and not trainer.is_server:
            trainer.follow()
            return
        params = initial_params(setup)
        cids = list(range(args.clients))
        start = time.perf_counter()
        for _ in range(args.rounds):
            trainer.local_process({"params": params}, cids)
            trainer.uplink_package()
            params = means.pop()
            now = time.perf_counter()
            times.append(now - start)
            start = now
            wire.append(getattr(trainer, "round_wire_bytes", 0))
        digest = float(params.double().sum())
        print(json.dumps({"times": times, "wire": wire, "digest": digest}), flush=True)
    finally:
        trainer.close()
        if ranks > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(args: argparse.Namespace, model: str, regime: str, data: Path, ranks: int) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--model", model,
        "--regime", regime, "--data", str(data), "--clients", str(args.clients),
        "--rounds", str(args.rounds), "--samples", str(args.samples),
        "--workers", str(args.workers),
    ]  # fmt: skip
    port = str(_free_port())
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if ranks > 1:
            env.update(
                RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
            )  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{model} {regime} on {ranks} ranks failed")
    result: dict = json.loads(outs[0].strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2, help="workers of the one rank; ranks")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", default="cnn,resnet18")
    parser.add_argument("--regimes", default="batch")
    parser.add_argument("--cohort", type=int, default=1000, help="clients per round, projected")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--regime", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    print(
        f"# {args.clients} clients x {args.samples} samples, {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; medians of {args.repeat}",
        flush=True,
    )
    header = (
        f"{'model':9} {'regime':6} {'1 rank x W s':>12} {'R ranks x 1 s':>13} {'ratio':>6} "
        f"{'wire MB/round':>13} {'model MB':>9} {'same bits':>9}"
    )
    print(header)
    print("-" * len(header), flush=True)
    projections = []
    with tempfile.TemporaryDirectory(prefix="emberfl-multirank-") as tmp:
        data = Path(tmp) / "data.safetensors"
        make_data(data, args.clients, args.samples, 0)
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            params = sum(
                t.numel() for t in create_model(MODELS[model], IN_SHAPE, NUM_CLASSES).parameters()
            )
            for regime in [r.strip() for r in args.regimes.split(",") if r.strip()]:
                one, many, wire, same = [], [], [], True
                for rep in range(args.repeat):
                    order = [1, args.workers] if rep % 2 == 0 else [args.workers, 1]
                    got = {r: run(args, model, regime, data, r) for r in order}
                    steady = {r: statistics.mean(got[r]["times"][1:]) for r in order}
                    one.append(steady[1])
                    many.append(steady[args.workers])
                    wire.append(statistics.median(got[args.workers]["wire"][1:]))
                    same &= got[1]["digest"] == got[args.workers]["digest"]
                t1, tr = statistics.median(one), statistics.median(many)
                w = statistics.median(wire)
                print(
                    f"{model:9} {regime:6} {t1:12.2f} {tr:13.2f} {tr / t1:6.2f} "
                    f"{w / 1e6:13.1f} {params * 4 / 1e6:9.1f} {same!s:>9}",
                    flush=True,
                )
                per_client = t1 * args.workers / args.clients
                # The stand-ins of the clients not on rank 0 (its share stays there).
                remote = args.clients * (args.workers - 1) / args.workers
                meta = max(0.0, w - (args.workers - 1) * params * (4 + 16)) / remote
                projections.append((model, regime, per_client, params, meta))
    print(f"\n# projection: {args.cohort} clients per round, {args.workers} workers per node")
    print(f"{'model':9} {'regime':6} {'nodes':>5} {'link':>8} {'train s':>8} {'wire s':>7}")
    for model, regime, per_client, params, meta in projections:
        for nodes in (8, 64):
            for gbps in (10, 100):
                train = per_client * args.cohort / (nodes * args.workers)
                levels = math.ceil(math.log2(nodes))
                moved = levels * params * (4 + 16) + args.cohort * meta
                print(
                    f"{model:9} {regime:6} {nodes:5} {gbps:>5}Gb/s {train:8.2f} "
                    f"{moved * 8 / (gbps * 1e9):7.2f}"
                )


if __name__ == "__main__":
    main()
