"""``emberfl run`` as a torch.distributed job on this machine: ranks started directly
(RANK, WORLD_SIZE, MASTER_ADDR ... as torchrun sets them) and by two torchrun agents
on 127.0.0.1 (c10d rendezvous, gloo over loopback) standing for two nodes.

The final model is bitwise the same for every layout and runtime with the defaults a
user types (no ``--threads``: one torch thread per client whatever the layout); a rank that dies,
stops or was launched with another configuration stops the job with one line naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import emberfl
from emberfl.checkpoint import WORK_PREFIX, RunDirLock
from emberfl.config import ConfigError
from emberfl.distributed.cluster import Cluster
from emberfl.metrics import read_metrics
from emberfl.simulation import run_simulation
from linux import default_sigint

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
BASE = [
    "--dataset", "digits", "--clients", "8", "--sample-ratio", "0.5", "--rounds", "3",
    "--epochs", "1", "--no-progress", "--quiet", "--rank-timeout", "3",
]  # fmt: skip
SETTINGS = {
    "dataset": "digits",
    "clients": 8,
    "sample_ratio": 0.5,
    "rounds": 3,
    "epochs": 1,
    "progress": False,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(**extra: str) -> dict[str, str]:
    # torch's default thread count: the ranks must set theirs from --threads, as rank 0.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env.update(extra)
    return env


def _ranks(
    world: int, args: list[str], per_rank: dict[int, list[str]] | None = None
) -> list[subprocess.Popen[str]]:
    """``world`` ranks of ``emberfl run ARGS``, started as torchrun would start them."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = _env(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        )  # fmt: skip
        extra = (per_rank or {}).get(rank, [])
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "emberfl", "run", *args, *extra],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                preexec_fn=default_sigint,
            )
        )
    return procs


def _agents(
    nodes: int, per_node: int, args: list[str], *extra: str, share_store: bool = False
) -> list[subprocess.Popen[str]]:
    """``nodes`` torchrun agents on 127.0.0.1, ``per_node`` ranks each (c10d rendezvous);
    ``share_store``: torch's default of sharing the agents' store with the ranks."""
    assert TORCHRUN is not None
    env = _env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    if share_store:
        del env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
    endpoint = f"127.0.0.1:{_free_port()}"
    return [
        subprocess.Popen(
            [
                TORCHRUN,
                "--nnodes",
                str(nodes),
                "--nproc-per-node",
                str(per_node),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "t",
                "--monitor-interval",
                "0.5",
                *extra,
                "-m",
                "emberfl",
                "run",
                *args,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=default_sigint,
        )
        for _ in range(nodes)
    ]


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            stdout, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, stdout + err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


def _same_model(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-process runs (the default workers) of FedAvg and SCAFFOLD."""
    root = tmp_path_factory.mktemp("reference")
    for algorithm in ("fedavg", "scaffold"):
        run_simulation(SETTINGS, algorithm=algorithm, out=str(root / algorithm))
    return {a: root / a for a in ("fedavg", "scaffold")}


@pytest.mark.parametrize(
    ("algorithm", "world", "runtime"),
    [
        ("fedavg", 2, ["--runtime", "process", "--workers", "1"]),
        ("scaffold", 2, ["--runtime", "thread", "--workers", "2"]),
        pytest.param("fedavg", 4, ["--runtime", "serial"], marks=pytest.mark.slow),
        pytest.param("scaffold", 3, ["--runtime", "process", "--workers", "0"],
                     marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_ranks_give_the_bits_of_one_process(
    references: dict[str, Path], tmp_path: Path, algorithm: str, world: int, runtime: list[str]
) -> None:
    out = tmp_path / "run"
    args = [*BASE, "--algorithm", algorithm, *runtime, "--out", str(out)]
    results = _finish(_ranks(world, args))
    assert all(code == 0 for code, _ in results), results
    assert _same_model(out, references[algorithm])
    layout = json.loads((out / "config.json").read_text())["layout"]
    assert layout["world_size"] == world
    assert not [p for p in out.iterdir() if p.name.startswith(WORK_PREFIX)]


def _state_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "client_state").glob("*"))}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["feddyn", "fednova", "ditto"])
def test_the_new_algorithms_on_ranks_give_the_bits_of_one_process(
    tmp_path: Path, algorithm: str
) -> None:
    # Quantity skew: clients take different numbers of steps (what FedNova corrects).
    skew = ["--partition", "quantity"]
    reference = tmp_path / "one"
    run_simulation({**SETTINGS, "partition": "quantity"}, algorithm=algorithm, out=str(reference))
    out = tmp_path / "run"
    args = [*BASE, *skew, "--algorithm", algorithm, "--workers", "1", "--out", str(out)]
    results = _finish(_ranks(2, args))
    assert all(code == 0 for code, _ in results), results
    assert _same_model(out, reference)
    # Per-client state (FedDyn's gradients, Ditto's personal models) lives where the
    # clients train, in the shared run directory: the same bytes as one process's.
    assert _state_files(out) == _state_files(reference)
    if algorithm == "ditto":  # the personalized accuracy, computed on every rank
        mine, theirs = read_metrics(out), read_metrics(reference)
        assert mine["personal_acc_mean"].tolist() == theirs["personal_acc_mean"].tolist()


def test_a_private_run_on_ranks_gives_the_bits_of_one_process(tmp_path: Path) -> None:
    pytest.importorskip("dp_accounting", reason="the privacy extra is not installed")
    # Poisson sampling and adaptive clipping: the cohort's size and the clip norm vary.
    dp = {"dp": "adaptive", "noise_multiplier": 0.8, "sampler": "poisson"}
    reference = tmp_path / "one"
    run_simulation({**SETTINGS, **dp}, out=str(reference))
    out = tmp_path / "run"
    flags = ["--dp", "adaptive", "--noise-multiplier", "0.8", "--sampler", "poisson"]
    results = _finish(_ranks(2, [*BASE, *flags, "--workers", "1", "--out", str(out)]))
    assert all(code == 0 for code, _ in results), results
    assert _same_model(out, reference)
    mine, theirs = read_metrics(out), read_metrics(reference)
    assert mine["epsilon"].tolist() == theirs["epsilon"].tolist()
    assert mine["clip_norm"].tolist() == theirs["clip_norm"].tolist()


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_two_torchrun_nodes_of_two_ranks_give_the_bits_of_one_process(
    references: dict[str, Path], tmp_path: Path, algorithm: str
) -> None:
    out = tmp_path / "run"
    args = [*BASE, "--algorithm", algorithm, "--workers", "1", "--out", str(out)]
    results = _finish(_agents(2, 2, args))
    assert all(code == 0 for code, _ in results), results
    assert _same_model(out, references[algorithm])
    layout = json.loads((out / "config.json").read_text())["layout"]
    assert layout == {"world_size": 4, "nodes": 2, "processes_per_node": 2, "workers_per_rank": 1}


def _session_left(procs: Sequence[subprocess.Popen[str] | psutil.Process]) -> list[int]:
    sessions = {p.pid for p in procs}
    left = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in sessions and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return left


def _wait_rows(run: Path, rows: int, procs: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + 120
    metrics = run / "metrics.csv"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > rows:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError([p.communicate() for p in procs])
        time.sleep(0.05)
    raise AssertionError(f"{metrics} never got {rows} rows")


@pytest.mark.faults
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_or_stopped_rank_is_named_and_nothing_is_left(tmp_path: Path, how: str) -> None:
    out = tmp_path / "run"
    args = [*BASE, "--rounds", "200", "--epochs", "5", "--workers", "1", "--out", str(out)]
    procs = _ranks(2, args)
    try:
        _wait_rows(out, 2, procs)
        victim = procs[1]
        os.kill(victim.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        started = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - started
        assert procs[0].returncode == 1, err
        assert "rank 1" in err and ("silent" in err or "failed" in err), err
        assert took < 20, took  # rank timeout 3 s, plus a round and the clean-up
        if how == "kill":  # the dead rank's worker process noticed and left too
            deadline = time.monotonic() + 10
            while _session_left(procs[1:]) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _session_left(procs[1:]) == []
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    # Rank 0's workers and its scratch are gone; the run can be resumed.
    deadline = time.monotonic() + 10
    while _session_left(procs[:1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session_left(procs[:1]) == []
    assert not [
        p for p in out.iterdir() if p.name.startswith(WORK_PREFIX) and "rank1" not in p.name
    ]


@pytest.mark.faults
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_torchrun_restarts_resume_bit_for_bit(
    references: dict[str, Path], tmp_path: Path, test_seed: int
) -> None:
    """Kill one rank of a 2-node job at a random round (``test_seed`` draws it);
    ``--max-restarts 1`` restarts the group, rank 0 resumes from the last checkpoint,
    and the model is the one of an uninterrupted run."""
    reference = tmp_path / "reference"
    settings = {**SETTINGS, "rounds": 12, "epochs": 5, "checkpoint_every": 1}
    run_simulation(settings, workers=2, out=str(reference))
    out = tmp_path / "run"
    args = [*BASE, "--rounds", "12", "--epochs", "5", "--checkpoint-every", "1",
            "--workers", "1", "--out", str(out)]  # fmt: skip
    agents = _agents(2, 1, args, "--max-restarts", "1")
    try:
        _wait_rows(out, random.Random(test_seed).randint(2, 6), agents)  # EMBERFL_TEST_SEED
        killed = False
        for proc in psutil.process_iter():
            try:
                env = proc.environ()
                if env.get("RANK") == "1" and "emberfl" in " ".join(proc.cmdline()[:4]):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
            except (psutil.Error, OSError):
                continue
        assert killed
        results = _finish(agents)
    finally:
        _finish(agents, timeout=1)
    assert all(code == 0 for code, _ in results), results
    assert any("resuming from round" in text for _, text in results), results
    assert _same_model(out, reference)
    assert len((out / "metrics.csv").read_text().splitlines()) == 13


@pytest.mark.faults
def test_a_killed_job_resumes_on_another_number_of_ranks(tmp_path: Path) -> None:
    """Kill every rank of a 2-rank job after a checkpoint; ``emberfl resume`` on 3 ranks
    (shares recomputed from each round's client list) ends with the uninterrupted model."""
    settings = {**SETTINGS, "rounds": 10, "epochs": 5, "checkpoint_every": 2}
    reference = tmp_path / "reference"
    run_simulation(settings, workers=2, out=str(reference))
    out = tmp_path / "run"
    args = [*BASE, "--rounds", "10", "--epochs", "5", "--checkpoint-every", "2",
            "--workers", "1", "--out", str(out)]  # fmt: skip
    procs = _ranks(2, args)
    try:
        _wait_rows(out, 3, procs)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert (out / "latest").exists()
    port = str(_free_port())
    resumed = [
        subprocess.Popen(
            [sys.executable, "-m", "emberfl", "resume", str(out), "--workers", "1"],
            env=_env(RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="3",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        for r in range(3)
    ]  # fmt: skip
    results = _finish(resumed)
    assert all(code == 0 for code, _ in results), results
    assert "resuming from round" in results[0][1]
    assert _same_model(out, reference)
    assert json.loads((out / "config.json").read_text())["layout"]["world_size"] == 3


def test_a_rank_with_another_configuration_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*BASE, "--runtime", "serial", "--out", str(out)]
    results = _finish(_ranks(2, args, per_rank={1: ["--lr", "0.5"]}))
    (code0, err0), (code1, err1) = results
    assert code1 == 2 and "rank 1's configuration differs from rank 0's: lr=0.5" in err1, err1
    assert code0 == 1 and "rank 1 failed (ConfigError" in err0, err0
    assert not (out / "model.safetensors").exists()


def test_more_ranks_than_clients_per_round_is_refused(tmp_path: Path) -> None:
    args = [*BASE, "--runtime", "serial", "--sample-ratio", "0.25", "--out", str(tmp_path / "r")]
    results = _finish(_ranks(3, args))
    for code, err in results:
        assert code == 2 and "2 clients per round cannot keep 3 ranks busy" in err, err


def test_launch_variables_make_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "h", "MASTER_PORT": "1", "TORCHELASTIC_RESTART_COUNT": "2"}  # fmt: skip
    cluster = Cluster.from_env(env)
    assert cluster is not None
    assert (cluster.rank, cluster.world_size, cluster.restart) == (3, 4, 2)
    assert cluster.layout(2) == {
        "world_size": 4, "nodes": 2, "processes_per_node": 2, "workers_per_rank": 2
    }  # fmt: skip
    assert cluster.device("cpu") == "cpu" and cluster.backend("cpu") == "gloo"
    # One GPU per rank: NCCL; two ranks of the node on one GPU: they share it, over gloo.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert (cluster.device("cuda"), cluster.backend("cuda")) == ("cuda:1", "nccl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert (cluster.device("cuda"), cluster.backend("cuda")) == ("cuda:0", "gloo")
    assert Cluster.from_env({**env, "WORLD_SIZE": "1", "RANK": "0"}) is None
    assert Cluster.from_env({"RANK": "0"}) is None
    with pytest.raises(ConfigError, match="launch variables"):
        Cluster.from_env({**env, "RANK": "x"})


def test_a_rank_that_cannot_see_the_run_directory_is_refused(tmp_path: Path) -> None:
    """SCAFFOLD's client states must be where every rank trains: a node that does not
    see rank 0's run directory is refused before round 1 (here: a probe it cannot read)."""
    cluster = Cluster(1, 2)
    sent = {"version": emberfl.__version__, "config": {}, "token": "abc"}
    with pytest.raises(ConfigError, match="every node shares"):
        cluster._check(sent, None, tmp_path, True)
    (tmp_path / f"{WORK_PREFIX}shared-abc").write_text("abc")
    cluster._check(sent, None, tmp_path, True)
    with pytest.raises(ConfigError, match=r"rank 0 runs 0\.0\.1"):
        cluster._check({**sent, "version": "0.0.1"}, None, tmp_path, False)


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_join_stops(tmp_path: Path, rank: int) -> None:
    """One rank of two, the other never started: it gives up after the join timeout
    (30 s for a rank timeout of 3 s) with one line, instead of waiting for ever."""
    out = tmp_path / "run"
    env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "emberfl", "run", *BASE, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "did not join within 30 s" in done.stderr, done.stderr
    assert 25 < took < 60, took
    if rank == 0:  # the one writer never took the run directory
        assert not (out / "metrics.csv").exists()


def _ranks_of(agents: list[subprocess.Popen[str]]) -> list[psutil.Process]:
    parents = {a.pid for a in agents}
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.ppid() in parents and "RANK" in proc.environ():
                found.append(proc)
    return found


@pytest.mark.faults
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_ranks_whose_torchrun_agents_die_stop_and_free_the_run(tmp_path: Path) -> None:
    """SIGKILL both agents of a 2-node job mid-run: their ranks, now orphans, notice
    within a second, stop as on SIGTERM (workers and scratch gone), and the run directory
    is free for ``emberfl resume``."""
    out = tmp_path / "run"
    args = [*BASE, "--rounds", "200", "--epochs", "5", "--workers", "1", "--out", str(out)]
    agents = _agents(2, 1, args)
    ranks: list[psutil.Process] = []
    try:
        _wait_rows(out, 2, agents)
        ranks = _ranks_of(agents)
        assert len(ranks) == 2, ranks
        for agent in agents:
            agent.kill()
            agent.wait()
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        said = " ".join(out + err for out, err in (a.communicate() for a in agents))
        assert said.count("its launcher") == 2, said
        deadline = time.monotonic() + 15
        while _session_left([*agents, *ranks]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _session_left([*agents, *ranks]) == []  # the ranks' workers too
    finally:  # torchrun starts its ranks in sessions of their own
        for proc in [*ranks, *agents]:
            with contextlib.suppress(OSError, psutil.Error):
                os.killpg(proc.pid, signal.SIGKILL)
        for agent in agents:
            if agent.stdout is not None and not agent.stdout.closed:
                agent.communicate()
    rows = len((out / "metrics.csv").read_text().splitlines())
    assert rows < 100, "the orphaned ranks ran on"
    with RunDirLock(out):  # nobody holds the run directory
        pass
    assert not [p for p in out.iterdir() if p.name.startswith(WORK_PREFIX)]


@pytest.mark.faults
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_max_restarts_with_the_agents_store_is_refused_before_round_1(tmp_path: Path) -> None:
    """``torchrun --max-restarts 1`` without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 cannot
    restart (the first restart finds the dead ranks): refused at once, naming the
    variable, not hours later at the first failure."""
    out = tmp_path / "run"
    args = [*BASE, "--workers", "1", "--out", str(out)]
    started = time.monotonic()
    results = _finish(_agents(2, 1, args, "--max-restarts", "1", share_store=True), timeout=120)
    assert time.monotonic() - started < 100
    assert all(code != 0 for code, _ in results), results
    assert all("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text for _, text in results), results
    assert not (out / "metrics.csv").exists()
