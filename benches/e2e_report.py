"""End-to-end report: emberfl's pools against a serial and a parallel floor.

FedAvg over CIFAR-10-shaped synthetic data (uint8 3x32x32, 10 classes, generated
with a fixed seed), all clients in every round, SGD, for two models (the PyTorch
tutorial CIFAR CNN and a ResNet-18) and two regimes (one local batch per client, where
framework overhead dominates, and one local epoch). Six ways to run the same work:

``emberfl-process``  ProcessPoolClientTrainer, ``--workers`` worker processes
``emberfl-thread``   ThreadPoolClientTrainer, ``--workers`` threads, 1 torch thread
``serial-floor``     a plain loop in one process, averaging with torch; the faster
                     of 1 and 2 torch threads
``parallel-floor``   the clients split evenly over ``--workers`` plain processes with
                     1 torch thread each, each training its share with no
                     communication at all; a round takes the slowest one's time
``thread-floor``     the same split over ``--workers`` plain threads of one process, 1
                     torch thread; a round is the wall time until the last thread ends
``blazefl-process``  BlazeFL 2.0's FedAvgProcessPoolClientTrainer (shared-memory IPC,
                     ``--workers`` processes) with its FedAvgBaseServerHandler
``blazefl-thread``   BlazeFL 2.0's FedAvgThreadPoolClientTrainer, ``--workers``
                     threads, 1 torch thread, with its FedAvgBaseServerHandler
``emberfl-*-dp``     the emberfl pool with client-level DP (``--dp central``): each
                     worker clips its clients' updates (``privatize``), the server
                     adds the round's noise to the exact sum (``ClientLevelDP``)

Each DP row is followed by its steady round over its pool's plain FedAvg row (the
cost of one norm per client in the worker and one noise draw per round on the server).

Both emberfl pools fold the uplinks where the clients train (``uplink_fold``): each
worker keeps an exact sum, and the parent merges one per worker a round.

The BlazeFL rows run only when ``blazefl`` (2.0.x, ``pip install
"blazefl[contrib]==2.0.3"``) is importable; otherwise they are skipped with one printed
line. BlazeFL's trainers and server handler run unchanged, driven the way its quickstart
drives them (handler's ``downlink_package``, trainer's ``local_process`` and
``uplink_package``, handler's ``load``); the report supplies only what BlazeFL leaves to
the user, its model selector and partitioned dataset. They do the same work as the other
rows: the same model (from the same seed), the same clients' samples read from the same
mapped store file, and the same batches in the same order -- the dataset ignores the
generator BlazeFL passes and shuffles from (seed, client id, round) as ``client_update``
does, each loader item is one whole batch gathered and scaled as there, one batch per
client in the ``batch`` regime and ``samples // batch`` in the ``epoch`` one, 1 local
epoch, the same lr (with 1 torch thread, the final model is bitwise the serial floor's:
``--check-blazefl-bits`` checks that, and tests/test_bench_e2e_blazefl.py runs it). What
differs is BlazeFL's own client code, kept as it is: it steps ``torch.optim.SGD`` (the
same update as ``sgd_step``, but building the optimizer costs each fresh process a
one-off import of torch's compiler stack, and the process pool's workers are fresh every
round), it builds a new model for every client (``select_model``), saves each client's
random-generator state to a file every round (process pool), shows tqdm bars (written to
the child's captured stderr), and averages with torch on the server. Its worker
processes get emberfl's default torch thread count (1), set by the selector in the
worker; BlazeFL itself leaves torch's default (one thread per core).

Every run is a fresh subprocess, sampled every 50 ms for the RSS and PSS of its whole
process tree (RSS counts pages of shared file mappings once per process; PSS shares
them out). "first" is the first round including the trainer's construction (worker
start-up); "steady" is the mean of the later rounds. With ``--repeat K`` every
implementation runs K times, in rotating order, and a row shows the median first and
steady round and the highest memory peak. All runs read the client data
from one memory-mapped store file and reuse one model object per process or thread,
so they differ only in how clients are run and results gathered.

Defaults are the full report (100 clients x 500 samples, 3 rounds, both models and
regimes): it takes a long time on a small machine. Scale it down with ``--clients``,
``--rounds``, ``--samples``, ``--models`` and ``--regimes``.

The script is one concept, this report, and stays one file (about 800 lines) so that it
runs with nothing but emberfl installed: each implementation is a short runner, and the
rest is the orchestration and memory sampling they share.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from emberfl import reproducibility, store
from emberfl.contrib.privacy import (
    ClientAccountant,
    ClientLevelDP,
    PrivateDownlinkPackage,
    privatize,
)
from emberfl.core import (
    FoldTerm,
    ProcessPoolClientTrainer,
    ThreadPoolClientTrainer,
    UplinkFold,
    deserialize_model,
    serialize_model,
)
from emberfl.core.model_packages import FedAvgDownlinkPackage, FedAvgUplinkPackage
from emberfl.core.training import sgd_step
from emberfl.models import create_model

MODELS = {"cnn": "cifar_cnn", "resnet18": "resnet18"}
REGIMES = ("batch", "epoch")
IMPLS = (
    "emberfl-process",
    "emberfl-thread",
    "serial-floor",
    "parallel-floor",
    "thread-floor",
    "blazefl-process",
    "blazefl-thread",
    "emberfl-process-dp",
    "emberfl-thread-dp",
)
BLAZEFL_IMPLS = ("blazefl-process", "blazefl-thread")
IN_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
# The DP rows' clip norm and noise multiplier (their cost does not depend on the values;
# a clip this small scales every update, the longer path).
DP_CLIP = 1.0
DP_NOISE = 1.0


# ------------------------------------------------------------------ shared client


@dataclass(frozen=True)
class Setup:
    data: str
    model: str
    regime: str
    samples: int
    batch: int
    lr: float
    seed: int


_DATA: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_MODELS: dict[tuple[str, int], torch.nn.Module] = {}
_LOCK = threading.Lock()


def _data(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The mapped data file, opened once per process."""
    with _LOCK:
        if path not in _DATA:
            f = store.open_file(path)
            _DATA[path] = (f["x"], f["y"])
        return _DATA[path]


def _model(name: str) -> torch.nn.Module:
    """One model object per (process, thread), reused by every client it runs."""
    key = (name, threading.get_ident())
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = create_model(name, IN_SHAPE, NUM_CLASSES, seed=0)
        return _MODELS[key]


def client_update(setup: Setup, params: torch.Tensor, cid: int, rnd: int) -> torch.Tensor:
    """Train client ``cid`` from ``params``; returns its flat parameters."""
    x_all, y_all = _data(setup.data)
    lo = cid * setup.samples
    x, y = x_all[lo : lo + setup.samples], y_all[lo : lo + setup.samples]
    model = _model(setup.model)
    deserialize_model(model, params)
    model.train()
    weights = list(model.parameters())
    g = torch.Generator().manual_seed(reproducibility.client_seed(setup.seed, cid, rnd))
    order = torch.randperm(setup.samples, generator=g)
    steps = 1 if setup.regime == "batch" else setup.samples // setup.batch
    for step in range(steps):
        idx = order[step * setup.batch : (step + 1) * setup.batch]
        xb = x[idx].float().div_(255.0)
        loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
        for w in weights:
            w.grad = None
        loss.backward()
        # torch.optim.SGD's step, bit for bit, without the optimizer: building one
        # imports torch's compiler stack on the first step (1.2 s of CPU here), a cost
        # every fresh process would pay -- the floors' included -- on top of start-up.
        sgd_step(weights, setup.lr)
    return serialize_model(model)


def initial_params(setup: Setup) -> torch.Tensor:
    return serialize_model(create_model(setup.model, IN_SHAPE, NUM_CLASSES, seed=0))


# --------------------------------------------------------------- implementations


class EmberProcessTrainer(ProcessPoolClientTrainer[dict, dict, dict, dict]):
    def __init__(self, setup: Setup, workers: int, start_method: str) -> None:
        self.num_parallels = workers
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[dict] = []
        self.stop_event = threading.Event()
        self.progress = False
        self.start_method = start_method
        self.setup = setup

    def get_client_config(self, cid: int) -> dict:
        return {"cid": cid, "setup": self.setup}

    @staticmethod
    def worker(
        config: dict, payload: Any, device: str, stop_event: Any, *, shm_buffer: Any = None
    ) -> Any:
        from emberfl.core import current_client

        rnd = current_client().round
        setup, cid = config["setup"], config["cid"]
        if isinstance(payload, PrivateDownlinkPackage):
            return _private_uplink(setup, payload, cid, rnd)
        params = client_update(setup, payload["params"], cid, rnd)
        return {"params": params, "n": setup.samples}


class EmberThreadTrainer(ThreadPoolClientTrainer[dict, dict]):
    def __init__(self, setup: Setup, workers: int) -> None:
        self.num_parallels = workers
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[dict] = []
        self.stop_event = threading.Event()
        self.progress = False
        self.setup = setup

    def worker(self, cid: int, device: str, payload: Any, stop_event: threading.Event) -> Any:
        from emberfl.core import current_client

        rnd = current_client().round
        if isinstance(payload, PrivateDownlinkPackage):
            return _private_uplink(self.setup, payload, cid, rnd)
        return {"params": client_update(self.setup, payload["params"], cid, rnd), "n": 1}


def _private_uplink(
    setup: Setup, payload: PrivateDownlinkPackage, cid: int, rnd: int
) -> FedAvgUplinkPackage:
    """A DP row's client: train, then clip the update as ``--dp central``'s client step."""
    trained = client_update(setup, payload.model_parameters, cid, rnd)
    package = FedAvgUplinkPackage(cid=cid, model_parameters=trained, data_size=setup.samples)
    return privatize(package, payload)


def run_emberfl(
    setup: Setup, impl: str, clients: int, rounds: int, workers: int, start_method: str
) -> list[float]:
    times = []
    start = time.perf_counter()
    if impl.startswith("emberfl-process"):
        trainer: Any = EmberProcessTrainer(setup, workers, start_method)
    else:
        torch.set_num_threads(1)
        trainer = EmberThreadTrainer(setup, workers)
    params = initial_params(setup)
    cids = list(range(clients))
    # FedAvg folded where the clients train (the trainer's uplink_fold): every worker
    # adds its clients' uplinks into its own exact sum and this process merges one sum
    # per worker a round -- what ``emberfl run`` does.
    dp = None
    if impl.endswith("-dp"):
        # --dp central with every client in every round: the denominator is K.
        dp = ClientLevelDP(
            mechanism="central",
            clip=DP_CLIP,
            noise_multiplier=DP_NOISE,
            expected_clients=float(clients),
            accountant=ClientAccountant("fixed", clients, 1.0),
            delta=1e-5,
            seed=setup.seed,
        )
        terms = dp.fold_terms()
    else:
        terms = (FoldTerm("params", "params", "n"),)
    folded: list[Any] = []
    trainer.uplink_fold = UplinkFold(terms, sink=folded.append)
    with trainer:
        for rnd in range(rounds):
            if dp is None:
                trainer.local_process({"params": params}, cids)
                trainer.uplink_package()
                params = folded.pop().sums.mean("params")
            else:
                payload = dp.downlink(FedAvgDownlinkPackage(model_parameters=params), rnd)
                trainer.local_process(payload, cids)
                trainer.uplink_package()
                params = dp.release(params, folded.pop().sums, [], rnd)
            now = time.perf_counter()
            times.append(now - start)
            start = now
    return times


def serial_fedavg(setup: Setup, clients: int, rounds: int) -> torch.Tensor:
    """The serial floor's final global parameters (its loop, untimed)."""
    params = initial_params(setup)
    for rnd in range(rounds):
        acc = torch.zeros_like(params)
        for cid in range(clients):
            acc.add_(client_update(setup, params, cid, rnd), alpha=1.0 / clients)
        params = acc
    return params


def run_serial(setup: Setup, clients: int, rounds: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    times = []
    params = initial_params(setup)
    for rnd in range(rounds):
        start = time.perf_counter()
        acc = torch.zeros_like(params)
        for cid in range(clients):
            acc.add_(client_update(setup, params, cid, rnd), alpha=1.0 / clients)
        params = acc
        times.append(time.perf_counter() - start)
    return times


def _floor_share(setup: Setup, cids: list[int], rounds: int, out: Any) -> None:
    torch.set_num_threads(1)
    params = initial_params(setup)
    _data(setup.data)  # mapped before timing, as a worker would have it
    times = []
    for rnd in range(rounds):
        start = time.perf_counter()
        for cid in cids:
            client_update(setup, params, cid, rnd)
        times.append(time.perf_counter() - start)
    out.put(times)


def run_thread_floor(setup: Setup, clients: int, rounds: int, workers: int) -> list[float]:
    torch.set_num_threads(1)
    params = initial_params(setup)
    _data(setup.data)
    shares = [list(range(clients))[i::workers] for i in range(workers)]
    times = []
    for rnd in range(rounds):

        def train(cids: list[int], rnd: int = rnd) -> None:
            for cid in cids:
                client_update(setup, params, cid, rnd)

        threads = [threading.Thread(target=train, args=(share,)) for share in shares]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times.append(time.perf_counter() - start)
    return times


def run_parallel_floor(setup: Setup, clients: int, rounds: int, workers: int) -> list[float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    shares = [list(range(clients))[i::workers] for i in range(workers)]
    procs = [
        ctx.Process(target=_floor_share, args=(setup, share, rounds, queue)) for share in shares
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return [max(r[i] for r in results) for i in range(rounds)]


# ------------------------------------------------------------- BlazeFL (optional)


def blazefl_missing() -> str | None:
    """Why the BlazeFL rows cannot run here, or None when they can."""
    try:
        from blazefl.contrib import FedAvgProcessPoolClientTrainer  # noqa: F401
        from blazefl.core import IPCMode  # noqa: F401
    except ImportError as exc:
        return f"blazefl 2.0 is not importable ({exc})"
    return None


class BlazeModelSelector:
    """BlazeFL's ModelSelector: a new model from the report's seed at every call, as in
    BlazeFL's quickstart. BlazeFL calls it in the pool's worker before training, so
    it also gives a worker process its torch thread count."""

    def __init__(self, worker_threads: int) -> None:
        self.worker_threads = worker_threads

    def select_model(self, model_name: str) -> torch.nn.Module:
        if mp.parent_process() is not None and torch.get_num_threads() != self.worker_threads:
            torch.set_num_threads(self.worker_threads)
        return create_model(model_name, IN_SHAPE, NUM_CLASSES, seed=0)


class _Batches(torch.utils.data.Dataset):
    """One client's samples; an item is a whole batch, gathered and scaled as in
    ``client_update``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx].float().div_(255.0), self.y[idx]


class BlazeDataset:
    """BlazeFL's PartitionedDataset over the report's store file. It pickles as the
    setup and the round (BlazeFL sends it to the workers with every client's config);
    the driver sets ``round`` before each round, so the batches are those of
    ``client_update`` for (seed, client id, round)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.round = 0

    def get_dataset(self, type_: str, cid: int | None) -> torch.utils.data.Dataset:
        assert cid is not None, "the report has no test split"
        x_all, y_all = _data(self.setup.data)
        lo = cid * self.setup.samples
        return _Batches(x_all[lo : lo + self.setup.samples], y_all[lo : lo + self.setup.samples])

    def set_dataset(self, type_: str, cid: int | None, dataset: torch.utils.data.Dataset) -> None:
        pass  # stateless: every round reads the same mapped samples

    def get_dataloader(
        self, type_: str, cid: int | None, batch_size: int | None, generator: Any
    ) -> torch.utils.data.DataLoader:
        assert cid is not None and batch_size is not None
        setup = self.setup
        seed = reproducibility.client_seed(setup.seed, cid, self.round)
        order = torch.randperm(setup.samples, generator=torch.Generator().manual_seed(seed))
        steps = 1 if setup.regime == "batch" else setup.samples // batch_size
        batches = [order[step * batch_size : (step + 1) * batch_size] for step in range(steps)]
        # batch_size=None: the sampler yields whole batches and nothing is collated.
        return torch.utils.data.DataLoader(
            self.get_dataset(type_, cid), batch_size=None, sampler=batches
        )


def blazefl_fedavg(
    setup: Setup, impl: str, clients: int, rounds: int, workers: int, scratch: Path
) -> tuple[list[float], torch.Tensor]:
    """FedAvg with BlazeFL's trainer ``impl`` and server handler, driven as in its
    quickstart; returns the round times and the final global parameters."""
    from blazefl.contrib import (
        FedAvgBaseServerHandler,
        FedAvgProcessPoolClientTrainer,
        FedAvgThreadPoolClientTrainer,
    )
    from blazefl.core import IPCMode

    dataset = BlazeDataset(setup)
    times = []
    start = time.perf_counter()
    common = {
        "model_selector": BlazeModelSelector(1),
        "model_name": setup.model,
        "dataset": dataset,
        "device": "cpu",
        "num_clients": clients,
        "batch_size": setup.batch,
        "seed": setup.seed,
    }
    handler = FedAvgBaseServerHandler(global_round=rounds, sample_ratio=1.0, **common)
    trainer: Any
    if impl == "blazefl-process":
        trainer = FedAvgProcessPoolClientTrainer(
            share_dir=scratch / "share",
            state_dir=scratch / "state",
            epochs=1,
            lr=setup.lr,
            num_parallels=workers,
            ipc_mode=IPCMode.SHARED_MEMORY,
            **common,
        )
    else:
        trainer = FedAvgThreadPoolClientTrainer(
            epochs=1, lr=setup.lr, num_parallels=workers, **common
        )
    while not handler.if_stop():
        dataset.round = handler.round
        trainer.local_process(handler.downlink_package(), handler.sample_clients())
        for package in trainer.uplink_package():
            handler.load(package)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times, serialize_model(handler.model)


def run_blazefl(
    setup: Setup, impl: str, clients: int, rounds: int, workers: int, start_method: str
) -> list[float]:
    import torch.multiprocessing as torch_mp

    torch_mp.set_start_method(start_method)  # BlazeFL's pool uses the default context
    if impl == "blazefl-thread":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="emberfl-e2e-blazefl-") as scratch:
        return blazefl_fedavg(setup, impl, clients, rounds, workers, Path(scratch))[0]


def check_blazefl_bits(
    args: argparse.Namespace, models: list[str], regimes: list[str], impls: list[str]
) -> int:
    """``--check-blazefl-bits``: with 1 torch thread, each BlazeFL row's final global
    model must be bitwise the serial floor's (same data, model, batches and lr).

    Returns the exit status: 0 when every row matched, or with a printed skip line when
    BlazeFL 2.0 is not importable; 1, naming the rows that differ, otherwise.
    """
    why_not = blazefl_missing()
    if why_not:
        print(f"# skipped the BlazeFL bits check: {why_not}", flush=True)
        return 0
    import torch.multiprocessing as torch_mp

    torch_mp.set_start_method(args.start_method)  # as run_blazefl
    torch.set_num_threads(1)
    rows = [i for i in impls if i in BLAZEFL_IMPLS] or list(BLAZEFL_IMPLS)
    failed = []
    with tempfile.TemporaryDirectory(prefix="emberfl-e2e-check-") as tmp:
        data = Path(tmp) / "data.safetensors"
        make_data(data, args.clients, args.samples, args.seed)
        for model in models:
            for regime in regimes:
                setup = Setup(
                    str(data), MODELS[model], regime, args.samples, args.batch, args.lr, args.seed
                )
                floor = serial_fedavg(setup, args.clients, args.rounds)
                for impl in rows:
                    scratch = Path(tmp) / f"{impl}-{model}-{regime}"
                    scratch.mkdir()
                    _, got = blazefl_fedavg(
                        setup, impl, args.clients, args.rounds, args.workers, scratch
                    )
                    name = f"{impl} {model} {regime}"
                    if torch.equal(got, floor):
                        print(f"{name}: bitwise the serial floor's", flush=True)
                        continue
                    differ = int((got != floor).sum()) if got.shape == floor.shape else -1
                    detail = (
                        f"{differ} of {floor.numel()} elements differ, largest by "
                        f"{(got - floor).abs().max().item():.3g}"
                        if differ >= 0
                        else f"shape {tuple(got.shape)}, the floor's {tuple(floor.shape)}"
                    )
                    print(f"{name}: final model differs from the serial floor's ({detail})")
                    failed.append(name)
    if failed:
        print(f"BlazeFL bits check failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    return 0


def child_main(args: argparse.Namespace) -> None:
    setup = Setup(
        data=args.data,
        model=MODELS[args.model],
        regime=args.regime,
        samples=args.samples,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
    )
    impl = args.child
    if impl.startswith("emberfl"):
        times = run_emberfl(setup, impl, args.clients, args.rounds, args.workers, args.start_method)
    elif impl.startswith("blazefl"):
        times = run_blazefl(setup, impl, args.clients, args.rounds, args.workers, args.start_method)
    elif impl.startswith("serial-floor"):
        times = run_serial(setup, args.clients, args.rounds, int(impl.rsplit("-", 1)[1][0]))
    elif impl == "thread-floor":
        times = run_thread_floor(setup, args.clients, args.rounds, args.workers)
    else:
        times = run_parallel_floor(setup, args.clients, args.rounds, args.workers)
    print(json.dumps({"times": times}), flush=True)


# ------------------------------------------------------------------ orchestrator


def _rollup(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process, from /proc/PID/smaps_rollup: one cheap read,
    where psutil's memory_full_info walks every mapping (and so perturbs the timings)."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f:
            if line.startswith(b"Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"Pss:"):
                pss = int(line.split()[1]) * 1024
    return rss, pss


class TreeSampler:
    """Peak RSS and PSS (bytes) of a process and all its descendants, and the peak RSS
    of the process itself (the server's side, where results are gathered)."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.root = psutil.Process(pid)
        self.period = period
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_root_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    r, s = _rollup(p.pid)
                except OSError:
                    continue
                rss += r
                pss += s
                if p.pid == self.root.pid:
                    self.peak_root_rss = max(self.peak_root_rss, r)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def make_data(path: Path, clients: int, samples: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = clients * samples
    x = torch.randint(0, 256, (n, *IN_SHAPE), dtype=torch.uint8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), dtype=torch.int64, generator=g)
    store.save(path, {"x": x, "y": y})


def run_child(args: argparse.Namespace, impl: str, model: str, regime: str, data: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        impl,
        "--model",
        model,
        "--regime",
        regime,
        "--data",
        str(data),
        "--clients",
        str(args.clients),
        "--rounds",
        str(args.rounds),
        "--samples",
        str(args.samples),
        "--batch",
        str(args.batch),
        "--lr",
        str(args.lr),
        "--workers",
        str(args.workers),
        "--seed",
        str(args.seed),
        "--start-method",
        args.start_method,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    out, err = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {model} {regime} failed:\n{err}")
    times = json.loads(out.strip().splitlines()[-1])["times"]
    return {
        "times": times,
        "rss": sampler.peak_rss,
        "pss": sampler.peak_pss,
        "root_rss": sampler.peak_root_rss,
    }


def summarize(times: list[float]) -> tuple[float, float]:
    first = times[0]
    later = times[1:] or times
    return first, sum(later) / len(later)


def combine(runs: list[dict]) -> dict:
    """One row from repeated runs of one implementation: median first and steady round
    (this machine is shared; a single run can be off by 30%), highest memory peak."""
    summaries = [summarize(r["times"]) for r in runs]
    return {
        "first": statistics.median(s[0] for s in summaries),
        "steady": statistics.median(s[1] for s in summaries),
        "rss": max(r["rss"] for r in runs),
        "pss": max(r["pss"] for r in runs),
        "root_rss": max(r["root_rss"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=500, help="samples per client")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per implementation (alternating); rows show medians and peak memory",
    )
    parser.add_argument("--models", default="cnn,resnet18")
    parser.add_argument("--regimes", default="batch,epoch")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument(
        "--start-method",
        default="spawn",
        choices=("spawn", "forkserver"),
        help="how emberfl-process and blazefl-process start their workers",
    )
    parser.add_argument(
        "--check-blazefl-bits",
        action="store_true",
        help="instead of the report: check that each BlazeFL row's final model (of "
        "--impls, default both) is bitwise the serial floor's, with 1 torch thread; exits "
        "1 naming the rows that differ, 0 with a skip line when BlazeFL is missing",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--regime", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if args.rounds < 2 and not args.check_blazefl_bits:
        parser.error("--rounds must be at least 2 (one first round, one steady round)")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for r in regimes:
        if r not in REGIMES:
            parser.error(f"unknown regime {r!r}; choose from {', '.join(REGIMES)}")
    for i in impls:
        if i not in IMPLS:
            parser.error(f"unknown implementation {i!r}; choose from {', '.join(IMPLS)}")
    if args.check_blazefl_bits:
        sys.exit(check_blazefl_bits(args, models, regimes, impls))
    blazefl = [i for i in impls if i in BLAZEFL_IMPLS]
    why_not = blazefl_missing() if blazefl else None
    if why_not:
        print(f"# skipped {', '.join(blazefl)}: {why_not}", flush=True)
        impls = [i for i in impls if i not in BLAZEFL_IMPLS]
        if not impls:
            return
    elif blazefl:
        from importlib.metadata import version

        print(f"# blazefl {version('blazefl')}", flush=True)

    print(
        f"# {args.clients} clients x {args.samples} samples, {args.rounds} rounds, batch "
        f"{args.batch}, lr {args.lr}, {args.workers} workers ({args.start_method}), "
        f"{os.cpu_count()} CPUs, "
        f"torch {torch.__version__}",
        flush=True,
    )
    header = (
        f"{'model':9} {'regime':6} {'run':18} {'first s':>8} {'steady s':>9} {'start-up':>9} "
        f"{'x par.floor':>11} {'peak RSS MB':>12} {'peak PSS MB':>12} {'parent RSS MB':>14}"
    )
    with tempfile.TemporaryDirectory(prefix="emberfl-e2e-") as tmp:
        data = Path(tmp) / "data.safetensors"
        make_data(data, args.clients, args.samples, args.seed)
        print(header)
        print("-" * len(header), flush=True)
        for model in models:
            model_mb = (
                sum(
                    t.numel() * 4
                    for t in create_model(MODELS[model], IN_SHAPE, 10).state_dict().values()
                )
                / 2**20
            )
            for regime in regimes:
                runs: dict[str, list[dict]] = {impl: [] for impl in impls}
                threads_used: dict[str, set[str]] = {}
                for rep in range(args.repeat):
                    # Rotate the order so no implementation always runs first (or last).
                    for impl in impls[rep % len(impls) :] + impls[: rep % len(impls)]:
                        if impl == "serial-floor":
                            one = run_child(args, "serial-floor-1", model, regime, data)
                            two = run_child(args, "serial-floor-2", model, regime, data)
                            one_s, two_s = summarize(one["times"])[1], summarize(two["times"])[1]
                            runs[impl].append(one if one_s <= two_s else two)
                            threads_used.setdefault(impl, set()).add(
                                "1 thread" if one_s <= two_s else "2 threads"
                            )
                        else:
                            runs[impl].append(run_child(args, impl, model, regime, data))
                rows = {impl: combine(r) for impl, r in runs.items()}
                floor = rows.get("parallel-floor")
                floor_steady = floor["steady"] if floor else None
                for impl, row in rows.items():
                    first, steady = row["first"], row["steady"]
                    ratio = f"{steady / floor_steady:.2f}" if floor_steady else "-"
                    # Each repeat keeps the faster of 1 and 2 threads; name both if they differed.
                    used = " / ".join(sorted(threads_used.get(impl, ())))
                    name = impl + (f" ({used})" if used else "")
                    print(
                        f"{model:9} {regime:6} {name:18} {first:8.2f} {steady:9.2f} "
                        f"{first - steady:9.2f} {ratio:>11} {row['rss'] / 2**20:12.0f} "
                        f"{row['pss'] / 2**20:12.0f} {row['root_rss'] / 2**20:14.0f}",
                        flush=True,
                    )
                for impl in (i for i in rows if i.endswith("-dp")):
                    base = rows.get(impl.removesuffix("-dp"))
                    if base is not None:
                        print(
                            f"{'':9} {'':6} {impl} steady / {impl.removesuffix('-dp')} "
                            f"steady: {rows[impl]['steady'] / base['steady']:.3f}",
                            flush=True,
                        )
                serial = rows.get("serial-floor")
                if serial is not None and "emberfl-process" in rows:
                    budget = serial["rss"] / 2**20 + (args.workers + 3) * model_mb
                    got = rows["emberfl-process"]["rss"] / 2**20
                    print(
                        f"{'':9} {'':6} memory budget (serial floor + {args.workers + 3} x "
                        f"{model_mb:.1f} MB model): {budget:.0f} MB, emberfl-process "
                        f"{got:.0f} MB ({'within' if got <= budget else 'OVER'})",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
