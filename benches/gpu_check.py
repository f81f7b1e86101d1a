"""Everything that needs a GPU, in one short run: `python benches/gpu_check.py`.

Prints a table and exits non-zero when any check fails; on a machine without a CUDA
device it says so and exits with status 3 (nothing was checked). Meant to take under
8 minutes on one GPU:

1. the CUDA tests (``pytest -m cuda``);
2. ``store.load(device="cuda")`` against a pinned host-to-device copy of the same bytes
   (256 MiB, median of 5);
3. FedAvg rounds on the GPU, steady round of the process pool, the thread pool and the
   batched runtime (``benches/batched_report.py --device cuda``: the CIFAR CNN and the
   2NN workloads, and ResNet-18 on the pools) and the batched runtime's ratio to the best
   pool;
4. the distributed runtime: ``emberfl run`` as 2 ranks on this node (as torchrun starts
   them) with ``--device cuda`` -- NCCL when there are 2 GPUs, gloo when the ranks share
   one (NCCL refuses two ranks on one GPU) -- against the one-process run: both finish,
   and whether the final models are the same bits is shown.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from emberfl import store

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = 3


def _row(name: str, ok: bool | None, detail: str) -> tuple[str, str, str]:
    status = "skip" if ok is None else ("ok" if ok else "FAIL")
    print(f"{name:42} {status:5} {detail}", flush=True)
    return name, status, detail


def check_tests() -> tuple[str, str, str]:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(ROOT / "tests")],
        capture_output=True,
        text=True,
        check=False,
    )
    last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-200:]
    return _row("CUDA tests (pytest -m cuda)", run.returncode == 0, last)


def check_store_load(mib: int = 256) -> tuple[str, str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.safetensors"
        x = torch.randn(mib * 2**20 // 4)
        store.save(path, {"x": x})
        pinned = torch.empty_like(x).pin_memory()
        pinned.copy_(x)
        loads, copies = [], []
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            got = store.load(path, device="cuda")["x"]
            torch.cuda.synchronize()
            loads.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = pinned.to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            copies.append(time.perf_counter() - t)
        same = bool(torch.equal(got.cpu(), x)) and bool(torch.equal(ref.cpu(), x))
    gb = x.numel() * 4 / 1e9
    load_s, copy_s = statistics.median(loads), statistics.median(copies)
    return _row(
        f"store.load(device='cuda'), {mib} MiB",
        same,
        f"{gb / load_s:.1f} GB/s vs pinned copy {gb / copy_s:.1f} GB/s "
        f"({copy_s / load_s:.2f}x of the pinned copy)",
    )


def check_rounds(repeat: int) -> list[tuple[str, str, str]]:
    sys.path.insert(0, str(ROOT / "benches"))
    import batched_report

    rows = []
    try:
        table = batched_report.main(
            ["--device", "cuda", "--workloads", "cifar_cnn,2nn", "--repeat", str(repeat)]
        )
    except Exception as exc:
        return [_row("FedAvg rounds on the GPU", False, f"{type(exc).__name__}: {exc}")]
    try:
        table.update(
            batched_report.main(
                [
                    "--device",
                    "cuda",
                    "--workloads",
                    "resnet18",
                    "--runtimes",
                    "process,thread",
                    "--repeat",
                    str(repeat),
                ]
            )
        )
    except Exception as exc:
        rows.append(_row("ResNet-18 rounds on the GPU", False, f"{type(exc).__name__}: {exc}"))
    for workload in ("cifar_cnn", "2nn", "resnet18"):
        if not any(key[0] == workload for key in table):
            continue
        pools = [table[(workload, r)] for r in ("process", "thread") if (workload, r) in table]
        batched = table.get((workload, "batched"))
        detail = ", ".join(
            f"{r} {table[(workload, r)]:.3f} s"
            for r in ("process", "thread", "batched")
            if (workload, r) in table
        )
        if batched and pools:
            detail += f"; best pool / batched {min(pools) / batched:.2f}x"
        rows.append(_row(f"FedAvg steady round on cuda, {workload}", True, detail))
    return rows


def check_distributed(device: str = "cuda") -> tuple[str, str, str]:
    import os
    import socket

    from safetensors.torch import load_file

    if device == "cuda":
        backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo (2 ranks share 1 GPU)"
    else:
        backend = "gloo"
    base = [
        sys.executable, "-m", "emberfl", "run", "--dataset", "digits", "--clients", "20",
        "--sample-ratio", "0.5", "--rounds", "3", "--epochs", "1", "--device", device,
        "--runtime", "thread", "--workers", "2", "--threads", "1", "--quiet", "--no-progress",
    ]  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])  # free once the socket is closed
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        one = subprocess.run(
            [*base, "--out", f"{tmp}/one"], capture_output=True, text=True, check=False
        )
        one_s = time.perf_counter() - start
        procs = []
        start = time.perf_counter()
        for rank in range(2):
            env = dict(
                os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                GLOO_SOCKET_IFNAME="lo",
            )  # fmt: skip
            procs.append(
                subprocess.Popen(
                    [*base, "--out", f"{tmp}/two"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        errors = [p.communicate(timeout=300)[1] for p in procs]
        two_s = time.perf_counter() - start
        if one.returncode or any(p.returncode for p in procs):
            detail = (one.stderr or "".join(errors)).strip().splitlines()[-1:]
            return _row(f"emberfl run on 2 ranks, {backend}", False, " ".join(detail))
        a = load_file(f"{tmp}/one/model.safetensors")
        b = load_file(f"{tmp}/two/model.safetensors")
        same = all(bool((a[k] == b[k]).all()) for k in a)
    return _row(
        f"emberfl run on 2 ranks, {backend}",
        True,
        f"1 process {one_s:.1f} s, 2 ranks {two_s:.1f} s (with start-up); same bits: {same}",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per round-timing row")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "no CUDA device is visible (torch.cuda.is_available() is False): nothing was "
            f"checked. Run this script on a machine with a GPU. Exit status {NO_GPU}."
        )
        return NO_GPU
    print(
        f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    rows = [check_tests(), check_store_load(), *check_rounds(args.repeat), check_distributed()]
    failed = [name for name, status, _ in rows if status == "FAIL"]
    print(
        f"{len(rows) - len(failed)} of {len(rows)} rows ok"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
