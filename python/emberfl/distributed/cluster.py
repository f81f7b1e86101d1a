"""A run spread over the ranks of a torch.distributed job, as torchrun starts it.

``torchrun --nnodes N --nproc-per-node G -m emberfl run ...`` starts ``N x G`` copies of
the same command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` ... in
their environment; :meth:`Cluster.from_env` reads them (``None``: one process, as
without torchrun). Rank 0 is the server and the only writer of the run directory;
every rank trains its share of each round with its own workers (see
:class:`~emberfl.distributed.trainer.DistributedClientTrainer`).

Before anything trains, :meth:`Cluster.agree` checks that the ranks can work together:
the same emberfl version and configuration on every rank (a bad launch gets one clear
line, not a divergent run) and, for algorithms that keep client state on disk
(SCAFFOLD), that every rank sees rank 0's run directory -- the state of a client
trained on one node is read on another the next time, so it must be on a shared
filesystem. Ranks must run on a trusted private network (see the README's "Many
machines"): torch.distributed's store and gloo have no authentication.

No rank is left waiting: :meth:`Cluster.start` gives the other ranks
:func:`join_timeout` to arrive (then this rank stops with one line), and from then on
a thread watches the process that launched this one (torchrun's agent): when it
dies, this rank stops too, instead of running on as an orphan holding the run
directory.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from emberfl import __version__
from emberfl.checkpoint import WORK_PREFIX
from emberfl.core.errors import RankFailedError
from emberfl.core.setting import ConfigError
from emberfl.distributed.rank_watch import RankWatch
from emberfl.fileio import atomic_write_text

__all__ = ["Cluster", "join_timeout"]

logger = logging.getLogger("emberfl.cluster")  # the name it had before it moved

_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# May differ between ranks: whether stderr is a terminal, and a default output
# directory (the other ranks take rank 0's, see ``agree``).
_PER_RANK = ("progress", "out")
#: How often the launcher watch looks at this process's parent.
_LAUNCHER_POLL = 0.5


def join_timeout(rank_timeout: float) -> float:
    """Seconds the ranks of a job have to meet in ``init_process_group``: ranks start
    together (torchrun starts them after its own rendezvous), but each imports torch
    and reads its configuration first, which a loaded node can slow down."""
    return max(30.0, 6.0 * rank_timeout)


class Cluster:
    """This process's place in a multi-rank job (rank, world size, ranks per node)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        local_rank: int = 0,
        local_world_size: int = 1,
        *,
        restart: int = 0,
    ) -> None:
        if world_size < 2 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} of a world of {world_size} is not a multi-rank job")
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        #: torchrun's restart count (after :meth:`start`: the largest of any rank's).
        self.restart = restart
        self.watch: RankWatch | None = None
        self._launcher: _LauncherWatch | None = None
        self._started = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Cluster | None:
        """The job torchrun (or any launcher setting its variables) started this process
        in; ``None`` without one, or for a world of one process."""
        env = os.environ if env is None else env
        if not all(name in env for name in _LAUNCH_VARIABLES):
            return None
        try:
            world = int(env["WORLD_SIZE"])
            if world < 2:
                return None
            return cls(
                int(env["RANK"]),
                world,
                int(env.get("LOCAL_RANK", "0")),
                int(env.get("LOCAL_WORLD_SIZE", "1")),
                restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
            )
        except ValueError as exc:
            raise ConfigError(f"bad torch.distributed launch variables: {exc}") from None

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    def layout(self, workers: int) -> dict[str, int]:
        """What ``config.json`` records of the job's shape."""
        return {
            "world_size": self.world_size,
            "nodes": max(1, self.world_size // max(1, self.local_world_size)),
            "processes_per_node": self.local_world_size,
            "workers_per_rank": workers,
        }

    def device(self, device: str) -> str:
        """This rank's device: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` (one GPU per rank;
        ranks share GPUs round-robin when a node has fewer GPUs than ranks)."""
        if device != "cuda":
            return device
        return f"cuda:{self.local_rank % max(1, torch.cuda.device_count())}"

    def backend(self, device: str) -> str:
        """NCCL when every rank of the node has a GPU of its own, else gloo (NCCL refuses
        two ranks on one GPU; with gloo the sums cross through host memory)."""
        if device.startswith("cuda") and torch.cuda.device_count() >= self.local_world_size:
            return "nccl"
        return "gloo"

    # -- start and stop ----------------------------------------------------------

    def start(self, device: str, *, rank_timeout: float, collective_timeout: float) -> None:
        """Join the job's process group (NCCL on GPUs, gloo on CPUs) and start beating.

        :class:`~emberfl.core.errors.RankFailedError` when the other ranks have not
        joined within :func:`join_timeout`; :class:`ConfigError` for a launch that
        could not restart (see :func:`_check_restartable`).
        """
        if self._started:
            return
        _check_restartable(os.environ)
        if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent
            self._launcher = _LauncherWatch(self.rank, rank_timeout)
        backend = self.backend(device)
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        elif device.startswith("cuda"):
            logger.info(
                "%d ranks on this node share %d GPU(s): their collectives use gloo",
                self.local_world_size,
                torch.cuda.device_count(),
            )
        join = join_timeout(rank_timeout)
        with _deadline(join + 2 * rank_timeout, self.rank, join):
            try:
                if not dist.is_initialized():
                    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=join))
                if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
                    raise ConfigError("the process group does not match RANK / WORLD_SIZE")
                # torchrun counts restarts per node: a node whose own workers did not
                # fail restarts with its count unchanged. So the ranks agree on the
                # largest count (any restart means the job resumes), and on a fresh
                # namespace in the store from rank 0 (a store may outlive an attempt).
                dev = torch.device("cuda", self.local_rank) if backend == "nccl" else None
                shared = torch.tensor(
                    [self.restart, secrets.randbits(62) if self.is_server else 0], device=dev
                )
                dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            except (RuntimeError, TimeoutError) as exc:  # DistStoreError, gloo's timeouts
                raise RankFailedError(
                    None,
                    f"the job's other ranks did not join within {join:g} s "
                    f"({type(exc).__name__}: {_first_line(exc)})",
                    "joining the job",
                ) from exc
        _set_collective_timeout(datetime.timedelta(seconds=collective_timeout))
        self.restart = int(shared[0])
        self.watch = RankWatch(
            self.rank,
            self.world_size,
            namespace=f"emberfl/{int(shared[1]):x}",
            timeout=rank_timeout,
        )
        self._started = True

    def close(self) -> None:
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self._started and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self._started = False

    # -- agreeing before round 1 ---------------------------------------------------

    def agree(
        self, config: dict[str, Any] | None, run_dir: Path, *, shared_state: bool
    ) -> tuple[dict[str, Any], Path]:
        """Rank 0's configuration and run directory, checked on every rank.

        Rank 0 passes its resolved configuration; another rank passes its own (refused
        when it differs, apart from ``progress`` and ``out``, or when the emberfl
        versions differ) or ``None`` to adopt rank 0's (``emberfl resume`` on a node
        without the run directory). With ``shared_state`` every rank must see a file
        rank 0 writes into its run directory.
        """
        watch = self.watch
        assert watch is not None, "start() first"
        token = uuid.uuid4().hex
        probe = run_dir / f"{WORK_PREFIX}shared-{token}"
        if self.is_server:
            if shared_state:
                atomic_write_text(probe, token)
            message = {
                "version": __version__,
                "config": config,
                "run_dir": str(run_dir.resolve()),
                "token": token,
            }
            watch.post("config", json.dumps(message))
            try:
                watch.meet("agreed", "checking that every rank has the same configuration")
            finally:
                probe.unlink(missing_ok=True)
            assert config is not None
            return config, run_dir
        sent = json.loads(watch.get("config", 0, "waiting for rank 0's configuration"))
        run_dir = Path(sent["run_dir"])
        try:
            self._check(sent, config, run_dir, shared_state)
        except ConfigError as exc:
            watch.fail(f"ConfigError: {exc}")
            raise
        watch.meet("agreed", "checking that every rank has the same configuration")
        agreed: dict[str, Any] = sent["config"]
        return agreed, run_dir

    def _check(
        self, sent: dict[str, Any], mine: dict[str, Any] | None, run_dir: Path, shared: bool
    ) -> None:
        if sent["version"] != __version__:
            raise ConfigError(
                f"rank {self.rank} runs emberfl {__version__}, rank 0 runs {sent['version']}: "
                "install the same version on every node"
            )
        theirs = sent["config"]
        keys = sorted(
            k
            for k in set(mine or {}) | set(theirs)
            if k not in _PER_RANK and (mine or {}).get(k) != theirs.get(k)
        )
        if mine is not None and keys:
            shown = ", ".join(f"{k}={mine.get(k)!r} (rank 0: {theirs.get(k)!r})" for k in keys)
            raise ConfigError(
                f"rank {self.rank}'s configuration differs from rank 0's: {shown}; "
                "every rank must run the same command"
            )
        if shared:
            probe = run_dir / f"{WORK_PREFIX}shared-{sent['token']}"
            try:
                seen = probe.read_text()
            except OSError:
                seen = None
            if seen != sent["token"]:
                raise ConfigError(
                    f"rank {self.rank} does not see rank 0's run directory {run_dir}: this "
                    "algorithm keeps each client's state there (client_state/), and a client "
                    "may train on any rank, so the run directory must be on a filesystem "
                    "every node shares"
                )

    def scratch(self, run_dir: Path) -> Path:
        """A scratch directory for a rank other than 0: in the run directory when this
        node sees it (so a resume removes what a killed rank left), else in the
        system's temporary directory."""
        parent = run_dir if run_dir.is_dir() else None
        prefix = f"{WORK_PREFIX}rank{self.rank}-"
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


# -- launch checks and watches --------------------------------------------------------


def _check_restartable(env: Mapping[str, str]) -> None:
    """Refuse ``torchrun --max-restarts`` with the store torchrun's agents share.

    With it, a restarted rank reconnects to the dead ranks of the attempt before: torchrun
    counts restarts per node, so the ranks of one node look for the new attempt's keys
    while the others find the old ones (pytorch#135712), and the job hangs or dies at
    the first restart, hours after its launch. Without restarts the shared store is fine.
    """
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        restarts = 0
    if restarts > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ConfigError(
            f"torchrun --max-restarts {restarts} cannot restart this job: its ranks share the "
            "agents' store, where a restarted rank finds the dead ranks of the attempt "
            "before (pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before "
            "torchrun, or leave out --max-restarts"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def _set_collective_timeout(timeout: datetime.timedelta) -> None:
    """Collectives get their own timeout once the group is joined (torch >= 2.3)."""
    setter = getattr(dist, "set_timeout", None) or getattr(
        dist.distributed_c10d, "_set_pg_timeout", None
    )
    if setter is not None:
        setter(timeout)


def _stop_now(message: str) -> None:
    """One line, then exit: for a rank whose main thread is stuck in torch's C++ (a
    join that never completes), where no Python exception can reach it."""
    with contextlib.suppress(Exception):
        print(f"emberfl: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


@contextlib.contextmanager
def _deadline(seconds: float, rank: int, join: float) -> Any:
    """Exit the process when the block has not finished within ``seconds``: torch's own
    join timeout normally ends it first, with an exception."""
    timer = threading.Timer(
        seconds,
        _stop_now,
        (f"rank {rank}: the job's other ranks did not join within {join:g} s; stopping",),
    )
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class _LauncherWatch:
    """Stops this rank when the process that launched it (torchrun's agent) is gone.

    A rank whose agent died is an orphan: nothing restarts it or stops it, and it would
    run on, or wait forever for ranks that will not come, holding the run directory's
    lock. Its parent process changes when the agent dies (it is re-parented to init or
    a subreaper), so a thread compares ``getppid()`` with the one at the start; then
    SIGTERM stops the rank as ``emberfl`` stops on SIGTERM (workers stopped, scratch
    removed), and if that has not ended it within the grace period, it exits.
    """

    def __init__(self, rank: int, grace: float) -> None:
        self.rank, self.grace = rank, max(5.0, 2 * grace)
        self._parent = os.getppid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._parent > 1:  # a parent to watch (not started by init itself)
            self._thread = threading.Thread(
                target=self._watch, name="emberfl-launcher-watch", daemon=True
            )
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(_LAUNCHER_POLL):
            if os.getppid() == self._parent:
                continue
            with contextlib.suppress(Exception):
                print(
                    f"emberfl: error: rank {self.rank}: its launcher (pid {self._parent}) "
                    "exited; stopping",
                    file=sys.stderr,
                    flush=True,
                )
            os.kill(os.getpid(), signal.SIGTERM)
            if not self._stop.wait(self.grace):
                _stop_now(f"rank {self.rank} did not stop within {self.grace:g} s of SIGTERM")
            return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * _LAUNCHER_POLL + 1)
