"""FedAvg: BlazeFL compatibility, training on digits, aggregation, NaN handling and
bitwise agreement of the serial, thread-pool and process-pool trainers."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emberfl.aggregate import NonFiniteError, OutOfRangeError
from emberfl.contrib import (
    FedAvgBaseClientTrainer,
    FedAvgBaseServerHandler,
    FedAvgClientUpdate,
    FedAvgDownlinkPackage,
    FedAvgPartitionType,
    FedAvgProcessPoolClientTrainer,
    FedAvgThreadPoolClientTrainer,
    FedAvgTrainerSettings,
    FedAvgUplinkPackage,
)
from emberfl.core import BaseServerHandler, IPCMode, deserialize_model, serialize_model
from emberfl.core.fold import InProcessFold
from emberfl.streaming import StreamingSum

# Bitwise comparisons need one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

CLIENTS = 6  # the digits fixture's (tests/conftest.py)


def _handler(digits: Any, rounds: int = 2, ratio: float = 0.5, **kw: Any) -> Any:
    dataset, selector = digits
    return FedAvgBaseServerHandler(
        selector, "mlp", dataset, rounds, CLIENTS, ratio, "cpu", 512, 7, **kw
    )


def _train(handler: Any, trainer: Any) -> list[float]:
    accuracies = [handler.get_summary()["server_acc"]]
    while not handler.is_stopped():
        trainer.local_process(handler.downlink_package(), handler.sample_clients())
        for package in trainer.uplink_package():
            handler.load(package)
        accuracies.append(handler.get_summary()["server_acc"])
    return accuracies


def test_blazefl_names_and_constructor_arguments() -> None:
    blazefl = {
        "FedAvgBaseServerHandler": [
            "model_selector", "model_name", "dataset", "global_round", "num_clients",
            "sample_ratio", "device", "batch_size", "seed",
        ],
        "FedAvgBaseClientTrainer": [
            "model_selector", "model_name", "dataset", "device", "num_clients", "epochs",
            "batch_size", "lr", "seed",
        ],
        "FedAvgProcessPoolClientTrainer": [
            "model_selector", "model_name", "state_dir", "dataset", "device", "num_clients",
            "epochs", "batch_size", "lr", "seed", "num_parallels",
        ],
        "FedAvgThreadPoolClientTrainer": [
            "model_selector", "model_name", "dataset", "device", "num_clients", "epochs",
            "batch_size", "lr", "seed", "num_parallels",
        ],
    }  # fmt: skip
    import emberfl.contrib as contrib

    for name, params in blazefl.items():
        sig = inspect.signature(getattr(contrib, name).__init__)
        positional = [
            p.name
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name != "self"
        ]
        assert positional == params, name
    for name in ("FedAvgUplinkPackage", "FedAvgDownlinkPackage", "FedAvgPartitionedDataset"):
        assert hasattr(contrib, name)
    up = FedAvgUplinkPackage(3, torch.zeros(2), 5)
    assert (up.cid, up.data_size, up.metadata) == (3, 5, None)
    assert FedAvgPartitionType.TRAIN == "train" and str(FedAvgPartitionType.TEST) == "test"


def test_two_rounds_on_digits_improve_accuracy_and_report_metadata(
    digits: Any, tmp_path: Path
) -> None:
    dataset, selector = digits
    handler = _handler(digits)
    trainer = FedAvgBaseClientTrainer(
        selector, "mlp", dataset, "cpu", CLIENTS, 2, 10, 0.1, 7, progress=False
    )
    cids = handler.sample_clients()
    trainer.local_process(handler.downlink_package(), cids)
    uplinks = trainer.uplink_package()
    assert [p.cid for p in uplinks] == cids
    for p in uplinks:
        assert p.data_size == len(dataset.get_dataset(FedAvgPartitionType.TRAIN, p.cid))
        assert p.metadata is not None
        assert p.metadata["loss"] > 0 and p.metadata["train_seconds"] > 0
        assert p.metadata["steps"] == 2 * -(-p.data_size // 10)
        assert p.model_parameters.dtype == torch.float32 and p.model_parameters.dim() == 1
    for p in uplinks:
        handler.load(p)
    accuracies = [0.0, handler.get_summary()["server_acc"]]
    accuracies += _train(handler, trainer)[1:]
    assert handler.round == 2
    assert accuracies[-1] > 0.5 > _handler(digits).get_summary()["server_acc"]


def test_weighted_average_matches_a_hand_computation(digits: Any) -> None:
    handler = _handler(digits)
    n = serialize_model(handler.model).numel()
    a, b = torch.randn(n), torch.randn(n)
    handler.load(FedAvgUplinkPackage(0, a, 1))
    handler.load(FedAvgUplinkPackage(1, b, 3))
    handler.load(FedAvgUplinkPackage(2, b, 0))
    assert handler.round == 1
    torch.testing.assert_close(serialize_model(handler.model), (a + 3 * b) / 4)
    assert torch.equal(
        FedAvgBaseServerHandler.aggregate([a, b], [1, 3]), serialize_model(handler.model)
    )


def test_nonfinite_updates_raise_naming_the_client_or_are_dropped(
    digits: Any, caplog: pytest.LogCaptureFixture
) -> None:
    handler = _handler(digits)
    n = serialize_model(handler.model).numel()
    bad = torch.ones(n)
    bad[5] = float("nan")
    before = serialize_model(handler.model).clone()
    handler.load(FedAvgUplinkPackage(4, torch.ones(n), 2))
    handler.load(FedAvgUplinkPackage(1, torch.ones(n), 2))
    with pytest.raises(NonFiniteError, match=r"clients \[5\]"):
        handler.load(FedAvgUplinkPackage(5, bad, 2))
    assert torch.equal(serialize_model(handler.model), before)

    dropping = _handler(digits, nonfinite="drop")
    inf = torch.full((n,), 2.0)
    inf[0] = float("inf")
    with caplog.at_level(logging.WARNING, logger="emberfl.contrib.fedavg"):
        dropping.load(FedAvgUplinkPackage(2, torch.full((n,), 3.0), 1))
        dropping.load(FedAvgUplinkPackage(3, inf, 5))
        dropping.load(FedAvgUplinkPackage(5, bad, 1))
    assert dropping.dropped == [3, 5]
    assert "dropping 2 client update(s)" in caplog.text
    assert torch.equal(serialize_model(dropping.model), torch.full((n,), 3.0))

    all_bad = _handler(digits, nonfinite="drop")
    for cid in range(3):
        all_bad.load(FedAvgUplinkPackage(cid, bad, 1))
    assert all_bad.round == 1
    assert torch.equal(serialize_model(all_bad.model), before)

    with pytest.raises(ValueError, match="nonfinite"):
        _handler(digits, nonfinite="ignore")


def _fold(handler: Any, uplinks: list[Any], order: list[int] | None = None) -> list[Any]:
    """Fold ``uplinks`` for ``handler`` as a trainer would (in ``order``); the stand-ins."""
    folding = InProcessFold(handler.uplink_fold(), len(uplinks))
    for i in order if order is not None else range(len(uplinks)):
        folding.add(i, uplinks[i])
    folding.finish()
    return folding.stand_ins


def test_folding_uplinks_equals_averaging_them(digits: Any) -> None:
    n = serialize_model(_handler(digits).model).numel()
    gen = torch.Generator().manual_seed(0)
    uplinks = [
        FedAvgUplinkPackage(cid, torch.randn(n, generator=gen), size, {"loss": 1.0})
        for cid, size in [(0, 17), (2, 5), (4, 40)]
    ]
    classic, folding = _handler(digits), _handler(digits)
    for p in uplinks:
        classic.load(p)
    # Folded in another order than the list's: the sums are exact, so it cannot matter.
    stand_ins = _fold(folding, uplinks, order=[2, 0, 1])
    for stand_in, p in zip(stand_ins, uplinks, strict=True):
        assert stand_in.model_parameters.is_meta and stand_in.model_parameters.shape == (n,)
        assert (stand_in.cid, stand_in.data_size, stand_in.metadata) == (
            p.cid,
            p.data_size,
            p.metadata,
        )
    for stand_in in stand_ins:
        folding.load(stand_in)
    assert folding.round == classic.round == 1
    folded_model = serialize_model(folding.model)
    assert torch.equal(folded_model, serialize_model(classic.model))
    assert not torch.equal(folded_model, serialize_model(_handler(digits).model))
    expected = (17 * uplinks[0].model_parameters + 5 * uplinks[1].model_parameters) / 62
    torch.testing.assert_close(folded_model, expected + 40 * uplinks[2].model_parameters / 62)
    # BlazeFL's helper is the same computation too, and the list's order is moot.
    weights = [p.data_size for p in uplinks]
    helper = FedAvgBaseServerHandler.aggregate([p.model_parameters for p in uplinks], weights)
    assert torch.equal(helper, folded_model)
    reordered = _handler(digits)
    for p in reversed(uplinks):
        reordered.load(p)
    assert torch.equal(serialize_model(reordered.model), folded_model)

    # Stand-ins mean nothing to another handler, and a round is folded whole or not at all.
    with pytest.raises(ValueError, match="stand-in"):
        _handler(digits).global_update(stand_ins)
    mixing = _handler(digits)
    folded = _fold(mixing, uplinks)
    with pytest.raises(ValueError, match="all folded or none"):
        mixing.global_update([folded[0], uplinks[1], uplinks[2]])
    # A round folded again replaces one left over from a failed round.
    _fold(mixing, uplinks[:2])
    mixing.global_update(_fold(mixing, uplinks))
    assert torch.equal(serialize_model(mixing.model), folded_model)


def test_folding_treats_nonfinite_updates_like_averaging(digits: Any) -> None:
    n = serialize_model(_handler(digits).model).numel()
    bad = torch.ones(n)
    bad[7] = float("inf")
    uplinks = [
        FedAvgUplinkPackage(1, torch.full((n,), 2.0), 3),
        FedAvgUplinkPackage(3, bad, 1),
        FedAvgUplinkPackage(5, torch.full((n,), 4.0), 1),
    ]
    raising = _handler(digits)
    with pytest.raises(NonFiniteError, match=r"model updates of clients \[3\]"):
        raising.global_update(_fold(raising, uplinks))

    classic, folding = _handler(digits, nonfinite="drop"), _handler(digits, nonfinite="drop")
    for p in uplinks:
        classic.load(p)
    for stand_in in _fold(folding, uplinks):
        folding.load(stand_in)
    assert classic.dropped == folding.dropped == [3]
    assert torch.equal(serialize_model(folding.model), serialize_model(classic.model))
    assert torch.equal(serialize_model(folding.model), torch.full((n,), 2.5))

    # A term beyond the exact grid's range (|w * x| >= 2**39) is refused on both paths;
    # below it, no sum of up to 2**24 terms can leave the float32 range.
    huge = [FedAvgUplinkPackage(c, torch.full((n,), 3e38), 1) for c in (0, 1, 2)]
    with pytest.raises(OutOfRangeError):
        _handler(digits).global_update(huge)
    with pytest.raises(OutOfRangeError):
        _fold(_handler(digits), huge)


def test_sampling_is_seeded_and_independent_of_evaluation(digits: Any) -> None:
    a, b = _handler(digits, rounds=5), _handler(digits, rounds=5)
    seq_a = [a.sample_clients() for _ in range(4)]
    seq_b = []
    for _ in range(4):
        b.get_summary()
        seq_b.append(b.sample_clients())
    assert seq_a == seq_b
    assert all(len(s) == 3 and s == sorted(set(s)) for s in seq_a)
    assert len({tuple(s) for s in seq_a}) > 1


@pytest.mark.parametrize(
    ("global_round", "num_clients", "sample_ratio", "message"),
    [
        # BlazeFL's messages, which its users' tests match on.
        (0, 10, 0.3, "global_round must be positive"),
        (1, 0, 0.3, "num_clients must be positive"),
        (1, 10, 0.0, "sample_ratio must be in the interval"),
        (1, 10, 1.1, "sample_ratio must be in the interval"),
        (1, 10, 0.05, "sample_ratio selects zero clients per round"),
    ],
)
def test_server_rejects_bad_sampling_settings_with_blazefl_messages(
    digits: Any, global_round: int, num_clients: int, sample_ratio: float, message: str
) -> None:
    dataset, selector = digits
    with pytest.raises(ValueError, match=message):
        FedAvgBaseServerHandler(
            model_selector=selector,
            model_name="mlp",
            dataset=dataset,
            global_round=global_round,
            num_clients=num_clients,
            sample_ratio=sample_ratio,
            device="cpu",
            batch_size=2,
            seed=42,
        )


def test_server_rejects_other_bad_settings(digits: Any) -> None:
    with pytest.raises(ValueError, match=r"global_round must be positive \(an int >= 1\), got 0"):
        _handler(digits, rounds=0)
    with pytest.raises(TypeError, match="global_round must be positive"):
        _handler(digits, rounds=1.5)
    with pytest.raises(ValueError, match="aggregation_threads must be positive"):
        _handler(digits, aggregation_threads=0)
    dataset, selector = digits
    with pytest.raises(ValueError, match="batch_size must be positive"):
        FedAvgBaseServerHandler(selector, "mlp", dataset, 1, CLIENTS, 0.5, "cpu", 0, 7)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
        FedAvgBaseServerHandler(selector, "mlp", dataset, 1, CLIENTS, 0.5, "cpu", 8, 2**32)
    with pytest.raises(TypeError, match="seed"):
        FedAvgBaseServerHandler(selector, "mlp", dataset, 1, CLIENTS, 0.5, "cpu", 8, "7")


def test_evaluate_rejects_an_empty_test_loader(digits: Any) -> None:
    model = _handler(digits).model
    empty = DataLoader(TensorDataset(torch.empty(0, 64), torch.empty(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="must yield at least one sample"):
        FedAvgBaseServerHandler.evaluate(model, empty, "cpu")
    # A non-empty loader gives a loss and an accuracy in [0, 1].
    one = DataLoader(TensorDataset(torch.zeros(3, 64), torch.tensor([0, 1, 2])), batch_size=2)
    loss, acc = FedAvgBaseServerHandler.evaluate(model, one, "cpu")
    assert loss > 0 and acc in (0.0, 1 / 3, 2 / 3, 1.0)


class _UsersHandler(BaseServerHandler[FedAvgUplinkPackage, FedAvgDownlinkPackage]):
    """A server of a user's own: plain data-size-weighted FedAvg, folded with a
    StreamingSum as each uplink arrives instead of buffered."""

    def __init__(self, model: nn.Module, per_round: int) -> None:
        self.model, self.per_round, self.round = model, per_round, 0
        self.sums = StreamingSum()

    def load(self, payload: FedAvgUplinkPackage) -> bool:
        self.sums.add([("model", payload.model_parameters, float(payload.data_size))])
        if self.sums.count < self.per_round:
            return False
        deserialize_model(self.model, self.sums.mean("model"))
        self.sums, self.round = StreamingSum(), self.round + 1
        return True

    def downlink_package(self) -> FedAvgDownlinkPackage:
        return FedAvgDownlinkPackage(serialize_model(self.model))

    def is_stopped(self) -> bool:
        return self.round >= 2


def test_a_custom_handler_folds_with_a_streaming_sum_bitwise_like_fedavg(digits: Any) -> None:
    dataset, selector = digits
    fedavg = _handler(digits)
    users = _UsersHandler(selector.select_model("mlp"), fedavg.num_clients_per_round)
    trainer = FedAvgBaseClientTrainer(
        selector, "mlp", dataset, "cpu", CLIENTS, 1, 10, 0.1, 7, progress=False
    )
    start = serialize_model(users.model).clone()
    while not users.is_stopped():
        cids = fedavg.sample_clients()
        trainer.local_process(fedavg.downlink_package(), cids)
        for package in trainer.uplink_package():
            assert fedavg.load(package) == users.load(package)
    assert users.round == fedavg.round == 2
    assert torch.equal(serialize_model(users.model), serialize_model(fedavg.model))
    assert not torch.equal(serialize_model(users.model), start)


def _trainers(digits: Any, tmp_path: Path) -> dict[str, Callable[..., Any]]:
    """Build each FedAvg trainer from the nine shared arguments (in BlazeFL's order)."""
    dataset, selector = digits

    def serial(*args: Any, **kw: Any) -> Any:
        return FedAvgBaseClientTrainer(selector, "mlp", dataset, *args, progress=False, **kw)

    def threads(*args: Any, **kw: Any) -> Any:
        return FedAvgThreadPoolClientTrainer(selector, "mlp", dataset, *args, 1, **kw)

    def process(*args: Any, **kw: Any) -> Any:
        # No worker processes: these tests build trainers, they run no client.
        return FedAvgProcessPoolClientTrainer(
            selector, "mlp", tmp_path / "state", dataset, *args, 0, progress=False, **kw
        )

    return {"serial": serial, "thread": threads, "process": process}


@pytest.mark.parametrize("kind", ["serial", "thread", "process"])
@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("cpu", 0, 1, 10, 0.1, 7), ValueError, r"num_clients must be positive \(an int >= 1\)"),
        (("cpu", 6, -1, 10, 0.1, 7), ValueError, "epochs must be non-negative"),
        (("cpu", 6, 1, 0, 0.1, 7), ValueError, "batch_size must be positive"),
        (("cpu", 6, 1, 10, 0.0, 7), ValueError, "lr must be a finite number > 0"),
        (("cpu", 6, 1, 10, float("nan"), 7), ValueError, "lr must be a finite number"),
        (("cpu", 6, 1, 10, "0.1", 7), TypeError, "lr must be a finite number"),
        (("cpu", 6, 1, 10, 0.1, -1), ValueError, r"seed must be an int in \[0, 2\*\*32\)"),
        (("cpu", 6, 1, 10, 0.1, 7.0), TypeError, "seed must be an int"),
        ((3, 6, 1, 10, 0.1, 7), TypeError, "device must be a str"),
    ],
)
def test_trainers_check_their_settings_in_one_place(
    digits: Any, tmp_path: Path, kind: str, args: tuple[Any, ...], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        _trainers(digits, tmp_path)[kind](*args)


@pytest.mark.parametrize("kind", ["serial", "thread", "process"])
def test_trainer_attributes_read_and_replace_the_shared_settings(
    digits: Any, tmp_path: Path, kind: str
) -> None:
    dataset, selector = digits
    trainer = _trainers(digits, tmp_path)[kind]("cpu", CLIENTS, 2, 10, 0.1, 7)
    settings = trainer.settings
    assert isinstance(settings, FedAvgTrainerSettings)
    assert (trainer.epochs, trainer.batch_size, trainer.lr, trainer.seed) == (2, 10, 0.1, 7)
    assert trainer.model_selector is selector and trainer.dataset is dataset
    assert type(trainer.client_update) is FedAvgClientUpdate
    trainer.lr = 0.5
    assert trainer.settings.lr == 0.5 and settings.lr == 0.1  # replaced, not mutated
    with pytest.raises(ValueError, match="batch_size must be positive"):
        trainer.batch_size = 0
    assert trainer.batch_size == 10
    if kind == "process":
        assert trainer.state_dir == tmp_path / "state" and trainer.state_dir.is_dir()
        config = trainer.get_client_config(3)
        assert (config.cid, config.lr, config.epochs, config.seed) == (3, 0.5, 2, 7)
        assert config.state_path == tmp_path / "state" / "3.safetensors"
        trainer.close()
    else:
        assert trainer.state_dir is None


def test_settings_attributes_need_the_base_init_first(digits: Any) -> None:
    dataset, selector = digits

    class Early(FedAvgBaseClientTrainer):
        def __init__(self) -> None:
            self.lr = 0.5  # before the base __init__ built the settings
            super().__init__(selector, "mlp", dataset, "cpu", CLIENTS, 1, 10, 0.1, 7)

    with pytest.raises(AttributeError, match=r"Early\.lr lives in the trainer's settings"):
        Early()


def test_process_trainer_accepts_blazefl2_ipc_modes(digits: Any, tmp_path: Path) -> None:
    build = _trainers(digits, tmp_path)["process"]
    default = build("cpu", CLIENTS, 1, 10, 0.1, 7)
    assert default.ipc_mode is IPCMode.STORAGE
    for given, expected in [
        (IPCMode.SHARED_MEMORY, IPCMode.SHARED_MEMORY),
        ("STORAGE", IPCMode.STORAGE),
        ("SHARED_MEMORY", IPCMode.SHARED_MEMORY),
    ]:
        trainer = build("cpu", CLIENTS, 1, 10, 0.1, 7, ipc_mode=given)
        assert trainer.ipc_mode is expected
        trainer.close()
    with pytest.raises(ValueError, match="ipc_mode must be one of STORAGE, SHARED_MEMORY"):
        build("cpu", CLIENTS, 1, 10, 0.1, 7, ipc_mode="pipes")
    default.close()


@pytest.mark.slow
def test_serial_thread_and_process_trainers_give_bitwise_identical_models(
    digits: Any, tmp_path: Path
) -> None:
    dataset, selector = digits
    args = (selector, "mlp", dataset, "cpu", CLIENTS, 2, 10, 0.1, 7)
    models: dict[str, torch.Tensor] = {}
    serial = FedAvgBaseClientTrainer(*args, progress=False)
    handler = _handler(digits, rounds=3)
    _train(handler, serial)
    models["serial"] = serialize_model(handler.model)

    with FedAvgThreadPoolClientTrainer(*args, 3, progress=False) as threads:
        handler = _handler(digits, rounds=3)
        _train(handler, threads)
        models["thread"] = serialize_model(handler.model)

    process = FedAvgProcessPoolClientTrainer(
        selector, "mlp", tmp_path / "state", dataset, "cpu", CLIENTS, 2, 10, 0.1, 7, 2,
        progress=False, share_dir=tmp_path,
    )  # fmt: skip
    process.torch_threads = 1  # type: ignore[attr-defined]
    with process:
        handler = _handler(digits, rounds=3)
        # Folded in the workers: the other two trainers hand over whole lists.
        process.uplink_fold = handler.uplink_fold()  # type: ignore[attr-defined]
        _train(handler, process)
        models["process"] = serialize_model(handler.model)

    assert torch.equal(models["serial"], models["thread"])
    assert torch.equal(models["serial"], models["process"])
    # And the run really trained: it differs from the initial model.
    assert not torch.equal(models["serial"], serialize_model(_handler(digits).model))


def test_serial_trainer_restores_the_global_random_state(digits: Any) -> None:
    dataset, selector = digits
    trainer = FedAvgBaseClientTrainer(
        selector, "mlp", dataset, "cpu", CLIENTS, 1, 10, 0.1, 7, progress=False
    )
    handler = _handler(digits)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    trainer.local_process(handler.downlink_package(), [0, 1])
    assert torch.equal(torch.rand(3), expected)
    # BlazeFL's serial trainer takes the bare parameter vector as well.
    trainer.uplink_package()
    trainer.local_process(handler.downlink_package().model_parameters, [0])
    assert len(trainer.uplink_package()) == 1


class _Flaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * float("inf")


class _FlakySelector:
    def select_model(self, name: str) -> nn.Module:
        return _Flaky()


def test_diverging_clients_stop_the_round_with_a_clear_error(digits: Any) -> None:
    dataset, _ = digits
    selector = _FlakySelector()
    handler = FedAvgBaseServerHandler(selector, "x", dataset, 1, CLIENTS, 0.5, "cpu", 64, 0)
    trainer = FedAvgThreadPoolClientTrainer(
        selector, "x", dataset, "cpu", CLIENTS, 1, 10, 0.1, 0, 2, progress=False
    )
    with trainer:
        trainer.local_process(handler.downlink_package(), handler.sample_clients())
        uplinks = trainer.uplink_package()
    with pytest.raises(NonFiniteError, match="hold NaN or Inf"):
        for p in uplinks:
            handler.load(p)


def test_stop_event_ends_local_training_between_epochs(digits: Any) -> None:
    dataset, selector = digits
    handler = _handler(digits)
    trainer = FedAvgThreadPoolClientTrainer(
        selector, "mlp", dataset, "cpu", CLIENTS, 3, 10, 0.1, 7, 1, progress=False
    )
    payload = handler.downlink_package()
    stop = threading.Event()
    stop.set()
    package = trainer.client_update(
        cid=0,
        model=selector.select_model("mlp"),
        payload=FedAvgDownlinkPackage(payload.model_parameters),
        loader=dataset.get_dataloader(FedAvgPartitionType.TRAIN, 0, 10, torch.Generator()),
        device="cpu",
        epochs=3,
        lr=0.1,
        stop_event=stop,
    )
    assert package.metadata is not None and package.metadata["steps"] == 0
    assert torch.equal(package.model_parameters, payload.model_parameters)
    trainer.close()
