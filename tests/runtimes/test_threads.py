"""The thread pool: order, per-client context, errors, timeouts, progress hooks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from emberfl.core import (
    ClientError,
    ClientTimeoutError,
    ThreadPoolClientTrainer,
    current_client,
)


class Trainer(ThreadPoolClientTrainer[dict, dict]):
    def __init__(self, num_parallels: int) -> None:
        self.num_parallels = num_parallels
        self.device = "cpu"
        self.device_count = 0
        self.cache: list[dict] = []
        self.stop_event = threading.Event()
        self.progress = False
        self.delays: dict[int, float] = {}
        self.fail: set[int] = set()

    def worker(self, cid: int, device: str, payload: dict, stop_event: threading.Event) -> dict:
        ctx = current_client()
        deadline = time.monotonic() + self.delays.get(cid, 0.0)
        while time.monotonic() < deadline and not stop_event.is_set():
            time.sleep(0.01)
        if cid in self.fail:
            raise RuntimeError(f"boom in {cid}")
        return {
            "cid": cid,
            "ctx": (ctx.cid, ctx.round, ctx.device),
            "draw": torch.rand(2, generator=ctx.rng.torch_cpu),
            "w": payload["w"] + cid,
            "thread": threading.current_thread().name,
        }


def test_results_in_cid_order_with_per_client_context() -> None:
    with Trainer(3) as trainer:
        trainer.delays = {4: 0.3, 1: 0.15}
        cids = [4, 1, 7, 2]
        for r in range(2):
            trainer.local_process({"w": torch.zeros(2)}, cids)
            out = trainer.uplink_package()
            assert [p["cid"] for p in out] == cids
            assert [p["ctx"] for p in out] == [(c, r, "cpu") for c in cids]
            assert all(torch.equal(p["w"], torch.full((2,), float(p["cid"]))) for p in out)
            assert all(p["thread"].startswith("emberfl-client-") for p in out)
        assert trainer.rounds_run == 2
        assert trainer.stop_event.is_set()
    # Same (seed, cid, round) -> same draws whatever the thread count.
    with Trainer(1) as single:
        single.local_process({"w": torch.zeros(2)}, [7])
        single.local_process({"w": torch.zeros(2)}, [7])
        again = single.uplink_package()[1]
    assert torch.equal(again["draw"], out[2]["draw"])


def test_a_raising_client_is_named_and_the_rest_are_dropped() -> None:
    with Trainer(2) as trainer:
        trainer.fail = {7}
        trainer.delays = {3: 10.0}
        start = time.monotonic()
        with pytest.raises(ClientError) as info:
            trainer.local_process({"w": torch.zeros(1)}, [3, 7, 5, 6])
        # Client 3 polls stop_event, so the running clients end quickly.
        assert time.monotonic() - start < 5.0
        assert info.value.cid == 7
        assert "RuntimeError: boom in 7" in str(info.value)
        assert "in worker" in info.value.remote_traceback
        assert trainer.cache == []
        trainer.fail = set()
        trainer.delays = {}
        trainer.local_process({"w": torch.zeros(1)}, [1, 2])
        assert [p["cid"] for p in trainer.uplink_package()] == [1, 2]


class GatedTrainer(Trainer):
    """Client 9 finishes only once ``gate`` is set (or fails after 30 s)."""

    def __init__(self, num_parallels: int) -> None:
        super().__init__(num_parallels)
        self.gate = threading.Event()

    def worker(self, cid: int, device: str, payload: dict, stop_event: threading.Event) -> dict:
        if cid == 9 and not self.gate.wait(30.0):
            raise TimeoutError("client 9: the first uplink was never handed over")
        return super().worker(cid, device, payload, stop_event)


def test_uplinks_are_handed_over_in_order_while_the_round_runs() -> None:
    with GatedTrainer(3) as trainer:
        trainer.delays = {1: 0.2}
        seen: list[tuple[int, int]] = []

        def on_uplink(index: int, package: dict) -> int:
            trainer.gate.set()  # a runtime that waited for the whole round would hang client 9
            seen.append((index, package["cid"]))
            return int(package["cid"]) * 10

        trainer.on_uplink = on_uplink
        cids = [4, 1, 0, 9, 2]
        trainer.local_process({"w": torch.zeros(1)}, cids)
        assert seen == list(enumerate(cids))
        assert trainer.uplink_package() == [c * 10 for c in cids]

        def refuse(index: int, package: dict) -> dict:
            raise ValueError(f"server refused {package['cid']}")

        trainer.on_uplink = refuse
        with pytest.raises(ValueError, match="refused 4"):
            trainer.local_process({"w": torch.zeros(1)}, [4, 5])
        assert trainer.cache == []


def test_client_timeout_in_threads() -> None:
    with Trainer(2) as trainer:
        trainer.client_timeout = 0.5  # type: ignore[attr-defined]
        trainer.delays = {2: 30.0}
        start = time.monotonic()
        with pytest.raises(ClientTimeoutError) as info:
            trainer.local_process({"w": torch.zeros(1)}, [1, 2])
        assert info.value.cid == 2
        assert time.monotonic() - start < 3.0
        assert trainer.stop_event.is_set()


class CountingTrainer(Trainer):
    def __init__(self, num_parallels: int) -> None:
        super().__init__(num_parallels)
        self.seen: list[int] = []

    def progress_fn(self, it: list[Future[dict]]) -> Iterable[Future[dict]]:
        for future in it:
            self.seen.append(len(it))
            yield future


def test_progress_fn_override_receives_futures() -> None:
    with CountingTrainer(2) as trainer:
        trainer.local_process({"w": torch.zeros(1)}, [0, 1, 2])
        assert trainer.seen == [3, 3, 3]
        assert len(trainer.uplink_package()) == 3


def test_invalid_attributes_are_reported() -> None:
    trainer = Trainer(0)
    with pytest.raises(ValueError, match="num_parallels"):
        trainer.local_process({"w": torch.zeros(1)}, [1])
    trainer.num_parallels = 1
    trainer.seed = -1  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"^Trainer\.seed must be an int in \[0, 2\*\*32\)"):
        trainer.local_process({"w": torch.zeros(1)}, [1])
    trainer.seed = "7"  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"^Trainer\.seed must be an int"):
        trainer.local_process({"w": torch.zeros(1)}, [1])
    trainer.seed = 0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"^client id must be an int in \[0, 2\*\*32\), got -1"):
        trainer.local_process({"w": torch.zeros(1)}, [0, -1])
    assert trainer.rounds_run == 0  # refused before the round started
    with pytest.raises(ValueError, match=r"^rounds_run must be an int in \[0, 2\*\*32\)"):
        trainer.rounds_run = 2**32
    with pytest.raises(TypeError, match=r"^rounds_run must be an int"):
        trainer.rounds_run = 1.0  # type: ignore[assignment]
    trainer.rounds_run = 5
    trainer.local_process({"w": torch.zeros(1)}, [1])
    assert trainer.uplink_package()[0]["ctx"] == (1, 5, "cpu")
    assert trainer.rounds_run == 6
    trainer.close()


def test_current_client_outside_a_client_raises() -> None:
    with pytest.raises(RuntimeError, match="outside a client"):
        current_client()


def test_close_waits_for_the_threads_to_exit() -> None:
    # A thread still unwinding torch state while the interpreter tears down the C++
    # runtime can abort the process at exit ("terminate called without an active
    # exception"), so close() returns only once the threads are gone.
    with Trainer(2) as t:
        t.local_process({"w": torch.zeros(3)}, list(range(6)))
        assert any(th.name.startswith("emberfl-client-") for th in threading.enumerate())
    assert not [th for th in threading.enumerate() if th.name.startswith("emberfl-client-")]


_EXIT_SCRIPT = """
import threading
import torch
from emberfl.core import ThreadPoolClientTrainer, current_client
from emberfl.models import create_model

MODELS = {}

class T(ThreadPoolClientTrainer[dict, dict]):
    def __init__(self):
        self.num_parallels = 2
        self.device = "cpu"
        self.device_count = 0
        self.cache = []
        self.stop_event = threading.Event()
        self.progress = False

    def worker(self, cid, device, payload, stop_event):
        key = threading.get_ident()
        model = MODELS.setdefault(key, create_model("cifar_cnn", (3, 32, 32), 10, seed=0))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.rand(50, 3, 32, 32, generator=current_client().rng.torch_cpu)
        loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(50, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"w": payload["w"] + cid}

torch.set_num_threads(1)
with T() as t:
    for _ in range(2):
        t.local_process({"w": torch.zeros(3)}, list(range(20)))
        t.uplink_package()
print("ok")
"""


@pytest.mark.slow
def test_a_script_using_the_thread_pool_exits_cleanly(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(_EXIT_SCRIPT)
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "ok"
