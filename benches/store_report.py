"""Store and aggregation report: one table, every number measured in the same run.

    python benches/store_report.py [--repeats 7] [--clients 10,100] [--quick]

Part 1 -- save, and load + read every byte, for a ResNet18-sized state dict (11.2M
float32 parameters with ResNet18's real shapes) and a small CNN: emberfl against
torch.save/torch.load, torch.load(mmap=True) and safetensors, with a plain read of
the same bytes (readinto a preallocated buffer, then the same reduction) as the floor.
Files sit in the page cache (each is read once before timing), so this measures the
software path, not the disk.

Part 2 -- the weighted mean of N client vectors of ResNet18 size: emberfl with 1 and 2
threads, with inputs in memory and mapped from store files, against a torch in-place
``add_`` loop and ``torch.stack`` + matmul. The ceiling is the machine's read
bandwidth measured by summing a 450 MB float32 array (the better of 1 and 2 torch
threads); each method's client-data GB/s is shown as a share of it.

Timings are medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import safetensors.torch as st
import torch

from emberfl import aggregate, store
from emberfl.models import count_parameters, create_model


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds per call. Fast calls run in batches of at least ~20 ms per sample,
    so timer resolution and the garbage collection between samples don't dominate."""
    t0 = time.perf_counter()
    fn()  # warm-up: page cache, allocator, lazy imports
    inner = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def reduce_all(tensors: dict[str, torch.Tensor]) -> float:
    """Touch every byte: the same reduction for every method."""
    total = 0.0
    for t in tensors.values():
        if t.dtype.is_floating_point and t.numel():
            total += float(t.sum())
        elif t.numel():
            total += float(t.view(-1).view(torch.uint8).sum())
    return total


def plain_read(path: Path, spans: list[tuple[torch.dtype, int, int]], buf: bytearray) -> float:
    """The floor: read the data section into a preallocated buffer, then run the same
    per-tensor reduction as :func:`reduce_all` on views of it (no parsing at all)."""
    nbytes = len(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(os.path.getsize(path) - nbytes)
        f.readinto(buf)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    total = 0.0
    for dtype, start, end in spans:
        if end == start:
            continue
        if dtype.is_floating_point:
            total += float(raw[start:end].view(dtype).sum())
        else:
            total += float(raw[start:end].sum())
    return total


def io_rows(name: str, state: dict[str, torch.Tensor], tmp: Path, repeats: int) -> list[str]:
    ours, theirs, pt = tmp / f"{name}.emb", tmp / f"{name}.st", tmp / f"{name}.pt"
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    buf = bytearray(nbytes)
    store.save(ours, state)
    mapped = store.open_file(ours)
    spans = [(mapped[n].dtype, *mapped.byte_range(n)) for n in mapped.names()]
    st.save_file(state, str(theirs))
    torch.save(state, pt)

    save = {
        "emberfl store.save": lambda: store.save(ours, state),
        "safetensors save_file": lambda: st.save_file(state, str(theirs)),
        "torch.save": lambda: torch.save(state, pt),
    }
    load = {
        "plain read (floor)": lambda: plain_read(ours, spans, buf),
        "emberfl store.load": lambda: reduce_all(store.load(ours)),
        "safetensors load_file": lambda: reduce_all(st.load_file(str(theirs))),
        "torch.load": lambda: reduce_all(torch.load(pt, weights_only=True)),
        "torch.load(mmap=True)": lambda: reduce_all(torch.load(pt, mmap=True, weights_only=True)),
    }
    save_t = {k: median_seconds(f, repeats) for k, f in save.items()}
    load_t = {k: median_seconds(f, repeats) for k, f in load.items()}
    base_save = save_t["safetensors save_file"]
    floor = load_t["plain read (floor)"]
    rows = [f"\n{name}: {nbytes / 1e6:.1f} MB, {len(state)} tensors"]
    rows.append(f"  {'save':<28}{'median ms':>10}{'x safetensors':>15}")
    for k, v in save_t.items():
        rows.append(f"  {k:<28}{v * 1e3:>10.2f}{v / base_save:>15.2f}")
    rows.append(f"  {'load + read all bytes':<28}{'median ms':>10}{'x plain read':>15}")
    for k, v in load_t.items():
        rows.append(f"  {k:<28}{v * 1e3:>10.2f}{v / floor:>15.2f}")
    return rows


def read_bandwidth(repeats: int) -> tuple[float, int]:
    """GB/s of summing a 450 MB float32 array: the better of 1 and 2 torch threads."""
    x = torch.ones(450_000_000 // 4)
    best, best_threads = 0.0, 1
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t = median_seconds(lambda: float(x.sum()), repeats)
        if x.numel() * 4 / t / 1e9 > best:
            best, best_threads = x.numel() * 4 / t / 1e9, threads
    torch.set_num_threads(before)
    return best, best_threads


def aggregation_times(n: int, numel: int, tmp: Path, repeats: int) -> dict[str, float]:
    """Median seconds of each weighted-mean method over ``n`` clients of ``numel`` floats."""
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(numel, generator=g) for _ in range(n)]
    weights = [float(i % 7 + 1) for i in range(n)]
    mapped = []
    for i, x in enumerate(xs):
        store.save(tmp / f"client{i}.emb", {"w": x})
        mapped.append(store.open_file(tmp / f"client{i}.emb").flat())
    out = torch.empty(numel)
    w_t = torch.tensor(weights) / sum(weights)

    def add_loop() -> None:
        out.zero_()
        for wi, x in zip(w_t.tolist(), xs, strict=True):
            out.add_(x, alpha=wi)

    def stack_matmul() -> None:
        torch.matmul(w_t, torch.stack(xs))

    methods: dict[str, Callable[[], object]] = {
        "torch add_ loop": add_loop,
        "torch.stack + matmul": stack_matmul,
    }
    for threads in (1, 2):
        methods[f"emberfl {threads}t, in memory"] = partial(
            aggregate.weighted_mean, xs, weights, out=out, threads=threads
        )
        methods[f"emberfl {threads}t, mapped files"] = partial(
            aggregate.weighted_mean, mapped, weights, out=out, threads=threads
        )
    times = {k: median_seconds(f, repeats) for k, f in methods.items()}
    for p in tmp.glob("client*.emb"):
        p.unlink()
    return times


def aggregation_rows(numel: int, counts: list[int], tmp: Path, repeats: int) -> list[str]:
    ceiling, ceiling_threads = read_bandwidth(repeats)
    rows = [
        f"\nread bandwidth ceiling: {ceiling:.2f} GB/s "
        f"(sum of a 450 MB float32 array, {ceiling_threads} torch thread(s))"
    ]
    rows.append(
        f"  {'weighted mean, ' + str(numel / 1e6) + 'M params':<36}{'N':>5}"
        f"{'median ms':>11}{'GB/s':>8}{'% ceil':>8}{'x add_ loop':>13}"
    )
    for n in counts:
        times = aggregation_times(n, numel, tmp, repeats)
        data_gb = n * numel * 4 / 1e9
        for k, v in times.items():
            rate = data_gb / v
            rows.append(
                f"  {k:<36}{n:>5}{v * 1e3:>11.1f}{rate:>8.2f}{100 * rate / ceiling:>7.0f}%"
                f"{times['torch add_ loop'] / v:>13.2f}"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clients", default="10,100", help="comma-separated client counts")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files")
    args = parser.parse_args()

    resnet = create_model("resnet18", (3, 32, 32), 10)
    cnn = create_model("cifar_cnn", (3, 32, 32), 10)
    numel = count_parameters(resnet)
    counts = [int(c) for c in args.clients.split(",")]
    if args.quick:
        numel, counts = 1_000_000, [min(c, 10) for c in counts]

    rows = [
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, medians of {args.repeats}"
    ]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        rows += io_rows(
            f"resnet18 ({count_parameters(resnet) / 1e6:.2f}M params)",
            resnet.state_dict(),
            tmp,
            args.repeats,
        )
        rows += io_rows(
            f"cifar_cnn ({count_parameters(cnn) / 1e3:.1f}k params)",
            cnn.state_dict(),
            tmp,
            args.repeats,
        )
        rows += aggregation_rows(numel, counts, tmp, args.repeats)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
