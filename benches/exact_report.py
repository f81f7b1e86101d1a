"""Exact accumulation report: every number measured in the same run, medians.

    python benches/exact_report.py [--repeats 9] [--numel 11170000]

For one ResNet18-sized float32 vector (11.17M values):

* adding it into an :class:`emberfl.aggregate.ExactSum` against today's float32
  :func:`emberfl.aggregate.accumulate` on the same data (the ratio is the cost of
  exactness), and the floor the exact add cannot beat: an in-place numpy add over the
  same 16 bytes per element of accumulator;
* merging two accumulators, as a share of the machine's read bandwidth (summing a
  450 MB float32 array with torch, the better of 1 and 2 threads); a merge reads
  32 bytes and writes 16 per element;
* ``finish`` (the once-rounded mean) and ``to_bytes``/``from_bytes``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from emberfl import aggregate


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page faults, allocator
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(repeats: int) -> tuple[float, int]:
    """GB/s of summing a 450 MB float32 array: the better of 1 and 2 torch threads."""
    x = torch.ones(450_000_000 // 4)
    before = torch.get_num_threads()
    best, best_threads = 0.0, 1
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t = median_seconds(lambda: float(x.sum()), repeats)
        if x.numel() * 4 / t / 1e9 > best:
            best, best_threads = x.numel() * 4 / t / 1e9, threads
    torch.set_num_threads(before)
    return best, best_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--numel", type=int, default=11_170_000)
    args = parser.parse_args()
    n, r = args.numel, args.repeats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    y = torch.randn(n, generator=g)
    bw, bw_threads = read_bandwidth(r)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {n / 1e6:.2f}M float32 values, "
        f"medians of {r}\nread bandwidth: {bw:.1f} GB/s (torch sum of 450 MB, "
        f"{bw_threads} thread(s))\n"
    )
    floor_acc = np.zeros(2 * n, dtype=np.int64)
    floor = median_seconds(partial(np.add, floor_acc, 1, out=floor_acc), r)
    floor_acc.resize(0, refcheck=False)
    print(f"{'':<44}{'threads':>8}{'median ms':>11}{'x f32':>8}{'GB/s':>8}{'% bw':>7}")
    print(f"  {'floor: numpy int64 += 1 over 16 B/elem':<42}{1:>8}{floor * 1e3:>11.1f}")
    for threads in (1, 2):
        acc = torch.zeros(n)
        t_f32 = median_seconds(partial(aggregate.accumulate, acc, x, 3.0, threads=threads), r)
        s = aggregate.ExactSum(n, threads=threads)
        t_add = median_seconds(partial(s.add, x, 3.0), r)
        other = aggregate.ExactSum(n, threads=threads)
        other.add(y, 5.0)
        t_merge = median_seconds(partial(s.merge, other), r)
        t_fin = median_seconds(s.finish, r)
        merge_gbs = 32 * n / t_merge / 1e9
        rows = [
            ("f32 accumulate (today)", t_f32, 12 * n),
            ("ExactSum.add", t_add, 36 * n),
            ("ExactSum.merge", t_merge, 48 * n),
            ("ExactSum.finish (mean, rounded once)", t_fin, 20 * n),
        ]
        for name, t, moved in rows:
            share = f"{100 * merge_gbs / bw:>6.0f}%" if name == "ExactSum.merge" else ""
            print(
                f"  {name:<42}{threads:>8}{t * 1e3:>11.1f}{t / t_f32:>8.2f}"
                f"{moved / t / 1e9:>8.1f}{share}"
            )
    blob = s.to_bytes()
    t_to = median_seconds(s.to_bytes, r)
    t_from = median_seconds(partial(aggregate.ExactSum.from_bytes, blob), r)
    print(
        f"  {'to_bytes / from_bytes (' + str(len(blob) // 10**6) + ' MB)':<42}{1:>8}"
        f"{t_to * 1e3:>11.1f} / {t_from * 1e3:.1f}"
    )
    print(
        "\nGB/s counts bytes moved: f32 accumulate 12 B/elem, add 36 (4 read, 16 read + "
        "16 written), merge 48 (32 read + 16 written), finish 20; '% bw' is the merge's "
        "32 B/elem read rate against the read bandwidth."
    )


if __name__ == "__main__":
    main()
