"""Folding uplinks where the clients train: the same bits on every layout.

FedAvg and SCAFFOLD runs on the digits federation, folded by the serial trainer, the
thread pool and the process pool (in-process and with 1-3 workers), in shuffled
completion orders, must end in the model that averaging the uplink lists gives.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from emberfl.aggregate import NonFiniteError
from emberfl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgClientUpdate,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
    FedAvgUplinkPackage,
    ScaffoldServerHandler,
)
from emberfl.contrib.fedavg import LocalRun
from emberfl.contrib.scaffold import ScaffoldClientUpdate
from emberfl.core import (
    FoldTerm,
    ProcessPoolClientTrainer,
    ThreadPoolClientTrainer,
    UplinkFold,
    current_client,
    serialize_model,
)
from emberfl.core.fold import FoldedRound, InProcessFold, WireStandIn

pytestmark = pytest.mark.usefixtures("one_thread")

CLIENTS = 6  # the digits fixture's (tests/conftest.py)
ROUNDS = 2


class ShuffledUpdate(FedAvgClientUpdate):
    """FedAvg's step after a random pause, so clients finish in a shuffled order.

    The pause comes from a generator of its own (``seed``, the ``test_seed`` fixture,
    and ``order`` seed it): the training is untouched. ``nan_cid`` makes that client's
    model NaN; ``die_cid`` makes its worker process exit once (the first time, marked by
    a file in ``die_flag``).
    """

    def __init__(
        self,
        order: int,
        *,
        seed: int,
        nan_cid: int | None = None,
        die_cid: int | None = None,
        die_flag: str | None = None,
    ) -> None:
        self.order = order
        self.seed = seed
        self.nan_cid = nan_cid
        self.die_cid = die_cid
        self.die_flag = die_flag

    def begin(self, run: LocalRun) -> None:
        pause = random.Random(f"{self.seed}:{self.order}:{run.cid}:{current_client().round}")
        time.sleep(pause.uniform(0.0, 0.03))
        if run.cid == self.die_cid and self.die_flag is not None:
            flag = Path(self.die_flag)
            if not flag.exists():
                flag.write_text("died")
                os._exit(3)

    def finish(
        self, run: LocalRun, package: FedAvgUplinkPackage, steps: int
    ) -> FedAvgUplinkPackage:
        if run.cid == self.nan_cid:
            package.model_parameters = torch.full_like(package.model_parameters, float("nan"))
        return package


class ShuffledScaffold(ScaffoldClientUpdate):
    """SCAFFOLD's step after a random pause (from ``seed``, as in ShuffledUpdate)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def begin(self, run: LocalRun) -> None:
        pause = random.Random(f"{self.seed}:scaffold:{run.cid}:{current_client().round}")
        time.sleep(pause.uniform(0.0, 0.03))
        super().begin(run)


def _handler(digits: Any, algorithm: str = "fedavg", **kw: Any) -> Any:
    dataset, selector = digits
    cls = ScaffoldServerHandler if algorithm == "scaffold" else FedAvgBaseServerHandler
    return cls(selector, "mlp", dataset, ROUNDS, CLIENTS, 1.0, "cpu", 512, 7, **kw)


def _run(handler: Any, trainer: Any, fold: bool) -> torch.Tensor:
    if fold:
        trainer.uplink_fold = handler.uplink_fold()
    with trainer if hasattr(trainer, "__enter__") else _null():
        while not handler.is_stopped():
            trainer.local_process(handler.downlink_package(), handler.sample_clients())
            for package in trainer.uplink_package():
                handler.load(package)
    return serialize_model(handler.model)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _trainer(
    digits: Any, kind: str, tmp_path: Path, update: FedAvgClientUpdate, workers: int = 2
) -> Any:
    dataset, selector = digits
    args = (selector, "mlp", dataset, "cpu", CLIENTS, 1, 16, 0.1, 7)
    if kind == "serial":
        return FedAvgBaseClientTrainer(*args, client_update=update, progress=False)
    if kind == "thread":
        return FedAvgThreadPoolClientTrainer(*args, workers, client_update=update, progress=False)
    trainer = FedAvgProcessPoolClientTrainer(
        selector, "mlp", tmp_path / "state", dataset, "cpu", CLIENTS, 1, 16, 0.1, 7, workers,
        client_update=update, progress=False, share_dir=tmp_path, torch_threads=1,
    )  # fmt: skip
    return trainer


def test_fedavg_folded_anywhere_gives_the_bits_of_the_list(
    digits: Any, tmp_path: Path, test_seed: int
) -> None:
    serial = _trainer(digits, "serial", tmp_path, ShuffledUpdate(0, seed=test_seed))
    reference = _run(_handler(digits), serial, fold=False)
    layouts = [
        ("serial", 1, 1),
        ("thread", 1, 2),
        ("thread", 3, 3),
        ("process", 0, 4),
        ("process", 1, 5),
        ("process", 3, 6),
    ]
    for kind, workers, order in layouts:
        update = ShuffledUpdate(order, seed=test_seed)
        trainer = _trainer(digits, kind, tmp_path / f"{kind}{workers}", update, workers)
        model = _run(_handler(digits), trainer, fold=True)
        assert torch.equal(model, reference), (kind, workers)
    # The process pool's list path too, and the run really trained.
    process = _trainer(digits, "process", tmp_path / "l", ShuffledUpdate(9, seed=test_seed))
    listed = _run(_handler(digits), process, False)
    assert torch.equal(listed, reference)
    assert not torch.equal(reference, serialize_model(_handler(digits).model))


def test_folded_stand_ins_carry_each_clients_metadata(
    digits: Any, tmp_path: Path, test_seed: int
) -> None:
    handler = _handler(digits)
    received: list[FoldedRound] = []
    fold = handler.uplink_fold()
    trainer = _trainer(digits, "process", tmp_path, ShuffledUpdate(1, seed=test_seed), 2)
    trainer.uplink_fold = UplinkFold(
        fold.terms, sink=lambda r: (received.append(r), fold.sink(r) if fold.sink else None)
    )
    cids = [4, 0, 5, 2]
    with trainer:
        trainer.local_process(handler.downlink_package(), cids)
        stand_ins = trainer.uplink_package()
        # No uplink file was written: the round directory held only the sums.
        assert trainer.share_path is not None
        assert not list(trainer.share_path.rglob("uplink-*"))
    assert [p.cid for p in stand_ins] == cids
    n = serialize_model(handler.model).numel()
    for p in stand_ins:
        assert p.model_parameters.is_meta and p.model_parameters.shape == (n,)
        assert p.data_size > 0
        assert p.metadata is not None and {"loss", "steps", "train_seconds"} <= set(p.metadata)
    assert len(received) == 1 and received[0].stand_ins == stand_ins
    assert received[0].sums.count == len(cids) and received[0].skipped == {}
    assert received[0].sums.total("model") == sum(p.data_size for p in stand_ins)


@pytest.mark.parametrize("kind", ["process", "thread", "serial"])
def test_nonfinite_uplinks_are_named_or_dropped(
    digits: Any, tmp_path: Path, kind: str, test_seed: int
) -> None:
    update = ShuffledUpdate(2, seed=test_seed, nan_cid=3)
    with pytest.raises(NonFiniteError, match=r"model updates of clients \[3\]"):
        _run(_handler(digits), _trainer(digits, kind, tmp_path / "a", update), fold=True)
    folded_handler = _handler(digits, nonfinite="drop")
    folded = _run(folded_handler, _trainer(digits, kind, tmp_path / "b", update), fold=True)
    assert folded_handler.dropped == [3]
    listed = _run(
        _handler(digits, nonfinite="drop"), _trainer(digits, "serial", tmp_path, update), False
    )
    assert torch.equal(folded, listed)


def test_scaffold_folds_model_and_control_on_every_layout(
    digits: Any, tmp_path: Path, test_seed: int
) -> None:
    dataset, selector = digits
    args = (selector, "mlp", dataset, "cpu", CLIENTS, 1, 16, 0.1, 7)
    results = {}
    for kind in ("serial-list", "serial", "thread", "process"):
        state = tmp_path / kind / "state"
        trainer: Any
        # SCAFFOLD's trainers are FedAvg's with its client step; this one pauses first.
        if kind.startswith("serial"):
            trainer = FedAvgBaseClientTrainer(
                *args, state_dir=state, client_update=ShuffledScaffold(test_seed), progress=False
            )
        elif kind == "thread":
            trainer = FedAvgThreadPoolClientTrainer(
                *args, 3, state_dir=state, client_update=ShuffledScaffold(test_seed), progress=False
            )
        else:
            trainer = FedAvgProcessPoolClientTrainer(
                selector, "mlp", state, dataset, "cpu", CLIENTS, 1, 16, 0.1, 7, 2,
                client_update=ShuffledScaffold(test_seed), progress=False, share_dir=tmp_path,
                torch_threads=1,
            )  # fmt: skip
        handler = _handler(digits, "scaffold")
        model = _run(handler, trainer, fold=kind != "serial-list")
        results[kind] = (model, handler.control.clone())
    reference_model, reference_control = results["serial-list"]
    assert not torch.equal(reference_control, torch.zeros_like(reference_control))
    for kind, (model, control) in results.items():
        assert torch.equal(model, reference_model), kind
        assert torch.equal(control, reference_control), kind


@pytest.mark.faults
def test_a_worker_dying_with_folded_sums_retrains_its_clients(
    digits: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, test_seed: int
) -> None:
    serial = _trainer(digits, "serial", tmp_path, ShuffledUpdate(0, seed=test_seed))
    reference = _run(_handler(digits), serial, fold=False)
    # Client 5 runs late in the round, in a worker that has folded others by then.
    update = ShuffledUpdate(3, seed=test_seed, die_cid=5, die_flag=str(tmp_path / "died"))
    trainer = _trainer(digits, "process", tmp_path / "p", update, 2)
    trainer.retry_crashed = True
    with caplog.at_level(logging.WARNING, logger="emberfl.core.pool"):
        model = _run(_handler(digits), trainer, fold=True)
    assert (tmp_path / "died").exists()
    assert "died holding the folded sums of" in caplog.text
    assert torch.equal(model, reference)


# -- the fold itself, with packages of a user's own ------------------------------------


def _pool_attributes(trainer: Any, workers: int) -> None:
    """The attributes BlazeFL's pool protocols ask every trainer to set."""
    trainer.num_parallels = workers
    trainer.device = "cpu"
    trainer.device_count = 0
    trainer.cache = []
    trainer.stop_event = threading.Event()
    trainer.progress = False


class DictProcessTrainer(ProcessPoolClientTrainer[dict, dict, int, dict]):
    def __init__(self, workers: int) -> None:
        _pool_attributes(self, workers)
        self.torch_threads = 1

    def get_client_config(self, cid: int) -> int:
        return cid

    @staticmethod
    def worker(
        config: int, payload: dict, device: str, stop_event: Any, *, shm_buffer: Any = None
    ) -> dict:
        g = torch.Generator().manual_seed(config)
        update = payload["w"] + torch.randn(payload["w"].shape, generator=g)
        return {"cid": config, "w": update.half(), "n": config + 1, "note": f"client {config}"}


class DictThreadTrainer(ThreadPoolClientTrainer[dict, dict]):
    def __init__(self, workers: int) -> None:
        _pool_attributes(self, workers)

    def worker(self, cid: int, device: str, payload: dict, stop_event: threading.Event) -> dict:
        return DictProcessTrainer.worker(cid, payload, device, stop_event)


def test_user_packages_fold_the_same_in_processes_and_threads() -> None:
    rounds: list[FoldedRound] = []
    fold = UplinkFold((FoldTerm("w", "w", "n"),), sink=rounds.append)
    payload = {"w": torch.linspace(-1, 1, 10_001)}
    cids = [7, 1, 4, 9, 2]
    for trainer in (DictProcessTrainer(2), DictThreadTrainer(3)):
        trainer.uplink_fold = fold
        with trainer:
            trainer.local_process(payload, cids)
            stand_ins = trainer.uplink_package()
        assert [p["cid"] for p in stand_ins] == cids
        assert all(p["w"].is_meta and p["w"].dtype == torch.float16 for p in stand_ins)
        assert [p["note"] for p in stand_ins] == [f"client {c}" for c in cids]
    expected = InProcessFold(UplinkFold(fold.terms), len(cids))
    for i, cid in enumerate(cids):
        expected.add(i, DictProcessTrainer.worker(cid, payload, "cpu", None))
    mean = expected.finish().sums.mean("w")
    assert len(rounds) == 2
    for folded in rounds:
        assert torch.equal(folded.sums.mean("w"), mean)
        assert folded.sums.total("w") == sum(c + 1 for c in cids)


def test_fold_checks_its_terms_and_packages() -> None:
    fold = UplinkFold((FoldTerm("model", "model_parameters", "data_size"),), sink=print)
    # The sink stays in this process.
    assert pickle.loads(pickle.dumps(fold)).sink is None
    assert pickle.loads(pickle.dumps(fold)) == fold
    package = FedAvgUplinkPackage(3, torch.ones(4), 2, {"loss": 0.5})
    assert fold.contributions(package) == [("model", package.model_parameters, 2.0)]
    wire = WireStandIn(fold.wire_skeleton(package), ())
    rebuilt = wire.package()
    assert rebuilt.cid == 3 and rebuilt.metadata == {"loss": 0.5}
    assert rebuilt.model_parameters.is_meta and rebuilt.model_parameters.shape == (4,)
    assert b"\x00\x00\x80?" not in wire.skeleton  # no tensor data travels
    with pytest.raises(ValueError, match="no fold term names"):
        UplinkFold((FoldTerm("x", "x"),)).stand_in({"x": torch.ones(2), "y": torch.ones(2)})
    with pytest.raises(AttributeError, match="no field 'nope'"):
        UplinkFold((FoldTerm("m", "nope"),)).contributions(package)
    with pytest.raises(TypeError, match="must hold a number"):
        UplinkFold((FoldTerm("m", "model_parameters", "metadata"),)).contributions(package)
    with pytest.raises(ValueError, match="names a sum twice"):
        UplinkFold((FoldTerm("m", "a"), FoldTerm("m", "b")))
    with pytest.raises(TypeError, match="FoldTerm"):
        UplinkFold(())
    with pytest.raises(TypeError, match="dataclasses or mappings"):
        fold.stand_in([torch.ones(2)])
    trainer = DictThreadTrainer(1)
    trainer.uplink_fold = "yes"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="must be an UplinkFold"):
        trainer.local_process({"w": torch.ones(3)}, [0])
    trainer.close()
