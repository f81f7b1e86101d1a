"""Soak test: a long run of many small rounds, watching for leaks.

1,000 clients (10 sampled per round), 300 rounds of a tiny model (logistic regression
on the Synthetic(1, 1) data, one local epoch) in the process pool. After every round
it samples the RSS of this process and of each worker process, their open file
descriptors, and the files in the trainer's share directory (round files) and in the
run directory. It prints the averages of the first and the last 50 rounds and a
verdict per series: flat, or growing when the last average exceeds the first by more
than the tolerance (RSS: 5% and 8 MiB; descriptors and files: 1). The files of the run
directory are shown but not judged: it gains its checkpoint (every 25 rounds) early on.

    python benches/soak.py                       # the full soak (a few minutes)
    python benches/soak.py --rounds 100 --json soak.json

A script, not a test: the figures depend on the machine. Exit status 1 when a series
grows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from emberfl.simulation import Simulation, SimulationConfig

MIB = 1024 * 1024


def count_files(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    return sum(len(files) for _, _, files in os.walk(path))


def sample(simulation: Simulation, me: psutil.Process) -> dict[str, float]:
    trainer = simulation.trainer
    worker_rss: list[float] = []
    worker_fds = 0
    for pid in trainer.worker_pids:
        try:
            proc = psutil.Process(pid)
            worker_rss.append(proc.memory_info().rss / MIB)
            worker_fds += proc.num_fds()
        except psutil.NoSuchProcess:
            continue
    return {
        "parent_rss_mib": me.memory_info().rss / MIB,
        "worker_rss_mib_max": max(worker_rss) if worker_rss else 0.0,
        "worker_rss_mib_sum": sum(worker_rss),
        "parent_fds": float(me.num_fds()),
        "worker_fds": float(worker_fds),
        "share_files": float(count_files(trainer.share_path)),
        "run_dir_files": float(count_files(simulation.run_dir)),
        "workers": float(len(worker_rss)),
    }


def growing(key: str, first: float, last: float) -> bool:
    if key.endswith("_mib") or "_rss_" in key:
        return last > first * 1.05 and last - first > 8.0
    return last - first > 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--window", type=int, default=50, help="rounds averaged at each end")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--algorithm", default="fedavg")
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", help="run directory (default: a temporary one, removed)")
    parser.add_argument("--json", help="write every round's samples to this file")
    args = parser.parse_args()
    if args.rounds < 2 * args.window:
        parser.error(f"--rounds must be at least 2 * --window ({2 * args.window})")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="emberfl-soak-") as tmp:
        run_dir = Path(args.out) if args.out else Path(tmp) / "run"
        config = SimulationConfig.from_mapping(
            {
                "algorithm": args.algorithm,
                "dataset": "synthetic",
                "model": "logreg",
                "clients": args.clients,
                "sample_ratio": args.per_round / args.clients,
                "rounds": args.rounds,
                "epochs": 1,
                "batch_size": 10,
                "lr": 0.05,
                "workers": args.workers,
                "threads": 1,
                "checkpoint_every": args.checkpoint_every,
                "eval_every": args.eval_every,
                "progress": False,
            }
        )
        me = psutil.Process()
        rows: list[dict[str, float]] = []
        start = time.perf_counter()
        with Simulation(config, run_dir) as simulation:
            simulation.prepare()
            while simulation.round < args.rounds:
                t0 = time.perf_counter()
                simulation.run_round()
                row = sample(simulation, me)
                row["round"] = float(simulation.round)
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                if simulation.round % 50 == 0:
                    print(
                        f"round {simulation.round}: parent {row['parent_rss_mib']:.1f} MiB, "
                        f"workers max {row['worker_rss_mib_max']:.1f} MiB, "
                        f"fds {row['parent_fds']:.0f}+{row['worker_fds']:.0f}, "
                        f"share files {row['share_files']:.0f}",
                        flush=True,
                    )
        wall = time.perf_counter() - start

    w = args.window
    keys = [k for k in rows[0] if k not in ("round", "seconds", "workers")]
    judged = [k for k in keys if k != "run_dir_files"]
    print(
        f"\n{args.rounds} rounds of {args.per_round}/{args.clients} clients "
        f"({args.algorithm}, {args.workers} workers) in {wall:.0f} s "
        f"({statistics.mean(r['seconds'] for r in rows) * 1000:.0f} ms per round)"
    )
    print(f"{'series':<20} {'first ' + str(w):>10} {'last ' + str(w):>10} {'change':>9}  verdict")
    any_growth = False
    summary: dict[str, Any] = {}
    for key in keys:
        first = statistics.mean(r[key] for r in rows[:w])
        last = statistics.mean(r[key] for r in rows[-w:])
        grows = growing(key, first, last) if key in judged else None
        any_growth |= bool(grows)
        summary[key] = {"first": first, "last": last, "growing": grows}
        label = "(not judged)" if grows is None else "GROWING" if grows else "flat"
        print(f"{key:<20} {first:>10.2f} {last:>10.2f} {last - first:>+9.2f}  {label}")
    restarts = max(r["workers"] for r in rows) != min(r["workers"] for r in rows)
    print(
        f"verdict: {'GROWING' if any_growth else 'flat'}"
        + (" (workers varied)" if restarts else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rounds": rows}, indent=1))
    return 1 if any_growth else 0


if __name__ == "__main__":
    sys.exit(main())
