"""Client-level DP-FedAvg on MNIST: test accuracy against ε at δ = 1e-5.

Users made from the training set: 6,000 clients of 10 images each (IID), the 2NN,
Poisson sampling with q = 100 / 6000 (about 100 clients a round), one local epoch of
batch 10, clip norm 1.0, a fixed number of rounds. For every ε the noise multiplier is
calibrated by dp-accounting (RDP) for those rounds (``--target-epsilon``); ε = ∞ is the
same run without DP. Writes under ``--out``: one run directory per ε, ``epsilon.png``
(accuracy against round) and ``summary.json`` (ε, noise multiplier, final accuracy).

    python experiments/dp_mnist_epsilon.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from emberfl.plot import plot_runs
from emberfl.simulation import SimulationConfig, run_simulation

EPSILONS = (math.inf, 8.0, 4.0, 2.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="experiments/results/dp-mnist-epsilon")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--epsilons", default=",".join(str(e) for e in EPSILONS))
    args = parser.parse_args()
    out = Path(args.out)
    base: dict[str, Any] = {
        "dataset": "mnist", "data_dir": args.data_dir, "model": "2nn", "clients": 6000,
        "sample_ratio": 100 / 6000, "sampler": "poisson", "epochs": 1, "batch_size": 10,
        "lr": args.lr, "rounds": args.rounds, "eval_every": max(1, args.rounds // 20),
        "checkpoint_every": 0, "progress": False,
    }  # fmt: skip
    summary = []
    dirs, labels = [], []
    for text in args.epsilons.split(","):
        eps = float(text)
        run_dir = out / f"eps-{text}"
        private = {} if math.isinf(eps) else {"dp": "central", "clip": 1.0, "target_epsilon": eps}
        result = run_simulation(SimulationConfig(**base, **private, out=str(run_dir)))
        last = result.metrics[-1]
        summary.append(
            {
                "target_epsilon": None if math.isinf(eps) else eps,
                "epsilon": last.extra.get("epsilon"),
                "noise_multiplier": last.extra.get("noise_multiplier"),
                "final_accuracy": last.accuracy,
                "rounds": args.rounds,
                "seconds": result.seconds,
            }
        )
        print(json.dumps(summary[-1]), flush=True)
        dirs.append(run_dir)
        labels.append("no DP" if math.isinf(eps) else f"ε = {text}")
    plot_runs(dirs, out / "epsilon.png", labels=labels, title="DP-FedAvg, MNIST 2NN")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
