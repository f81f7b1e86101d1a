"""McMahan et al. 2017, Table 1 setting: rounds of FedAvg to 97% MNIST test accuracy.

The 2NN (784-200-200-10, ReLU) on MNIST, 100 clients, C = 0.1 (10 clients a round),
E = 1 local epoch, B = 10:

* IID: every client gets 600 random training images;
* pathological non-IID: the images are sorted by label, cut into 200 shards of 300,
  and every client gets 2 shards (most clients see two digits).

The paper reports 87 (IID) and 664 (non-IID) rounds to reach 97% with a tuned
learning rate. This script runs both settings, stops each one when it reaches the
target (or its round budget), and writes under ``--out``:

* ``iid/`` and ``noniid/`` -- run directories (``metrics.csv``, ``model.safetensors``,
  ``config.json``);
* ``curves.png`` -- test accuracy against round for both;
* ``summary.json`` -- rounds to the target, wall time and the settings of each run.

    python experiments/mcmahan2017_table1.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from emberfl.plot import plot_runs
from emberfl.simulation import Simulation, SimulationConfig

REPO = Path(__file__).resolve().parents[1]
PAPER_ROUNDS = {"iid": 87, "noniid": 664}


def run_setting(
    name: str, args: argparse.Namespace, lr: float, max_rounds: int, out: Path
) -> dict[str, Any]:
    config = SimulationConfig(
        algorithm="fedavg",
        dataset="mnist",
        data_dir=str(args.data_dir),
        model="2nn",
        partition="iid" if name == "iid" else "shards",
        shards_per_client=2,
        clients=100,
        sample_ratio=0.1,
        epochs=1,
        batch_size=10,
        lr=lr,
        rounds=max_rounds,
        workers=args.workers,
        runtime=args.runtime,
        device=args.device,
        seed=args.seed,
        progress=False,
        out=str(out / name),
    )
    reached: int | None = None
    best = 0.0
    start = time.perf_counter()
    with Simulation(config) as simulation:
        simulation.prepare()
        for metrics in simulation.rounds():
            best = max(best, metrics.accuracy)
            if metrics.round % args.print_every == 0 or metrics.accuracy >= args.target:
                print(
                    f"[{name}] round {metrics.round:4d}  accuracy {metrics.accuracy:.4f}  "
                    f"loss {metrics.loss:.4f}  {time.perf_counter() - start:7.1f} s",
                    flush=True,
                )
            if reached is None and metrics.accuracy >= args.target:
                reached = metrics.round
                if not args.keep_going:
                    break
        simulation.save_model()
        rounds_run = simulation.round
    seconds = time.perf_counter() - start
    return {
        "setting": name,
        "lr": lr,
        "rounds_to_target": reached,
        "paper_rounds": PAPER_ROUNDS[name],
        "rounds_run": rounds_run,
        "best_accuracy": best,
        "seconds": round(seconds, 1),
        "run_dir": name,  # relative to --out, so the results can be moved
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO.parent / "shared" / "data" / "mnist",
        help="directory of the MNIST IDX files",
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "mcmahan2017-table1")
    parser.add_argument("--target", type=float, default=0.97, help="test accuracy to reach")
    parser.add_argument("--lr-iid", type=float, default=0.1, help="client learning rate, IID")
    parser.add_argument("--lr-noniid", type=float, default=0.1, help="client lr, non-IID")
    parser.add_argument("--max-rounds-iid", type=int, default=PAPER_ROUNDS["iid"])
    parser.add_argument("--max-rounds-noniid", type=int, default=PAPER_ROUNDS["noniid"])
    parser.add_argument(
        "--settings", nargs="+", choices=("iid", "noniid"), default=["iid", "noniid"]
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="run every round, not only up to the target"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runtime", choices=("process", "thread", "serial"), default="process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=10)
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        print(
            f"error: MNIST directory {args.data_dir} does not exist (--data-dir)", file=sys.stderr
        )
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} is not empty; choose another --out", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)

    results = []
    for name in args.settings:
        lr = args.lr_iid if name == "iid" else args.lr_noniid
        budget = args.max_rounds_iid if name == "iid" else args.max_rounds_noniid
        results.append(run_setting(name, args, lr, budget, args.out))

    png = plot_runs(
        [args.out / r["run_dir"] for r in results],
        args.out / "curves.png",
        labels=[
            f"{'IID' if r['setting'] == 'iid' else 'pathological non-IID'} (lr {r['lr']})"
            for r in results
        ],
        title="FedAvg, MNIST 2NN, C=0.1, E=1, B=10",
    )
    summary = {"target": args.target, "results": results, "curves": png.name}
    tmp = args.out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.out / "summary.json")

    print(f"\nrounds to {args.target:.0%} test accuracy (paper: IID 87, non-IID 664)")
    for r in results:
        got = r["rounds_to_target"]
        text = f"{got}" if got is not None else f"not reached in {r['rounds_run']}"
        ok = got is not None and got <= r["paper_rounds"]
        print(
            f"  {r['setting']:>6}: {text:>24}  (lr {r['lr']}, best {r['best_accuracy']:.4f}, "
            f"{r['seconds']:.0f} s){'' if ok else '  <- more than the paper'}"
        )
    print(f"curves: {png}")
    return 0 if all(r["rounds_to_target"] is not None for r in results) else 1


if __name__ == "__main__":  # worker processes import this file; they must not run main()
    sys.exit(main())
