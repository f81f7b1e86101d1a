"""FedDyn: the paper's rule against a plain-torch implementation, the server rule on
parameters and buffers, folding, dropped rounds, the batched form, and runs started
as a user starts them (layouts, checkpoint + resume, the setting)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cli_run import emberfl
from emberfl import store
from emberfl.config import SimulationConfig
from emberfl.contrib.fedavg import (
    FedAvgBaseClientTrainer,
    FedAvgBatchedClientTrainer,
    FedAvgDownlinkPackage,
    FedAvgUplinkPackage,
)
from emberfl.contrib.feddyn import (
    FEDDYN,
    GRADIENT_KEY,
    FedDynBatchedStep,
    FedDynClientUpdate,
    FedDynServerHandler,
)
from emberfl.core import serialize_model
from emberfl.core.client_state import ClientStateStore
from emberfl.core.fold import InProcessFold
from emberfl.crashpoints import CRASH_ENV
from emberfl.data import Partition, load_digits
from emberfl.models import ZooModelSelector
from emberfl.simulation import write_store

# Bitwise comparisons need one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

W0 = torch.tensor([[0.2, -0.1], [0.05, 0.3], [-0.2, 0.1]])
B0 = torch.tensor([0.01, -0.02, 0.03])
# Four hand-made clients of different sizes (so a data-size weighted mean differs).
DATA = [
    (torch.tensor([[1.0, 2.0]]), torch.tensor([0])),
    (torch.tensor([[-1.0, 0.5], [0.3, -0.7]]), torch.tensor([1, 2])),
    (torch.tensor([[0.5, 0.5], [2.0, -1.0], [-0.4, 1.5]]), torch.tensor([2, 0, 1])),
    (torch.tensor([[0.1, -2.0], [1.2, 0.3], [-1.5, -0.5], [0.7, 0.9]]), torch.tensor([0, 2, 1, 1])),
]


class TinySelector:
    def select_model(self, name: str) -> nn.Module:
        model = nn.Linear(2, 3)
        with torch.no_grad():
            model.weight.copy_(W0)
            model.bias.copy_(B0)
        return model


def _reference_client(
    theta: torch.Tensor, g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, alpha: float,
    lr: float, epochs: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Algorithm 1's client in plain torch (full batch): SGD on
    L(w) - <g, w> + alpha/2 ||w - theta||^2, then g - alpha (w - theta)."""
    w = theta.clone()
    for _ in range(epochs):
        w_ = w.clone().requires_grad_(True)
        logits = x @ w_[:6].view(3, 2).T + w_[6:]
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), w_)
        w = w - lr * (grad - g + alpha * (w - theta))
    return w, g - alpha * (w - theta)


def test_rounds_match_the_papers_rule(tmp_path: Path) -> None:
    alpha, lr, epochs, rounds, m = 0.3, 0.5, 3, 4, len(DATA)
    state = ClientStateStore(tmp_path / "state")
    handler = FedDynServerHandler(
        TinySelector(), "t", None, rounds, m, 0.5, "cpu", 8, 1, alpha_dyn=alpha
    )
    update = FedDynClientUpdate(alpha)
    theta = torch.cat([W0.ravel(), B0])
    h = torch.zeros(9)
    g = [torch.zeros(9) for _ in DATA]
    trained_twice = set()
    seen: set[int] = set()
    for _ in range(rounds):
        cids = handler.sample_clients()
        trained_twice |= seen & set(cids)
        seen |= set(cids)
        payload = handler.downlink_package()
        models = []
        for cid in cids:
            x, y = DATA[cid]
            loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
            package = update(
                cid=cid, model=TinySelector().select_model("t"), payload=payload,
                loader=loader, device="cpu", epochs=epochs, lr=lr, state=state,
            )  # fmt: skip
            handler.load(package)
            w, g[cid] = _reference_client(theta, g[cid], x, y, alpha=alpha, lr=lr, epochs=epochs)
            torch.testing.assert_close(package.model_parameters, w)
            stored = state.load(cid)
            assert stored is not None
            torch.testing.assert_close(stored[GRADIENT_KEY], g[cid])
            models.append(w)
        h = h - alpha / m * sum(w - theta for w in models)
        theta = torch.stack(models).mean(dim=0) - h / alpha
        torch.testing.assert_close(serialize_model(handler.model), theta)
        torch.testing.assert_close(handler.h, h)
    assert trained_twice, "no client trained twice: g_i was never used"
    assert h.abs().max() > 1e-3


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("stat", torch.zeros(2))


class BufferSelector:
    def select_model(self, name: str) -> nn.Module:
        torch.manual_seed(0)
        return WithBuffer()


def test_server_rule_on_parameters_buffers_folds_and_checkpoints() -> None:
    # State vector: stat (2, a buffer: state_dict puts it first), lin.weight (2), lin.bias.
    alpha, m = 0.5, 5
    handler = FedDynServerHandler(
        BufferSelector(), "b", None, 3, m, 0.4, "cpu", 8, 0, alpha_dyn=alpha
    )
    theta = serialize_model(handler.model).clone()
    ups = [
        FedAvgUplinkPackage(0, torch.tensor([10.0, 20.0, 1.0, 2.0, 3.0]), 1),
        FedAvgUplinkPackage(3, torch.tensor([30.0, 40.0, 0.0, -1.0, 1.0]), 9),
    ]
    folded = FedDynServerHandler(
        BufferSelector(), "b", None, 3, m, 0.4, "cpu", 8, 0, alpha_dyn=alpha
    )
    for p in ups:
        handler.load(p)
    mean = (ups[0].model_parameters + ups[1].model_parameters) / 2  # unweighted
    h = -alpha / m * 2 * (mean[2:] - theta[2:])
    torch.testing.assert_close(handler.h, h)
    expected = torch.cat([mean[:2], mean[2:] - h / alpha])  # the buffer: plain mean
    torch.testing.assert_close(serialize_model(handler.model), expected)

    fold = InProcessFold(folded.uplink_fold(), len(ups))
    for i in reversed(range(len(ups))):
        fold.add(i, ups[i])
    fold.finish()
    for stand_in in fold.stand_ins:
        folded.load(stand_in)
    assert torch.equal(folded.h, handler.h)
    assert torch.equal(serialize_model(folded.model), serialize_model(handler.model))

    resumed = FedDynServerHandler(
        BufferSelector(), "b", None, 3, m, 0.4, "cpu", 8, 0, alpha_dyn=alpha
    )
    resumed.load_checkpoint_state(handler.checkpoint_state())
    assert torch.equal(resumed.h, handler.h)
    for h_ in (handler, resumed):
        for p in ups:
            h_.load(p)
    assert torch.equal(resumed.h, handler.h)
    assert torch.equal(serialize_model(resumed.model), serialize_model(handler.model))
    with pytest.raises(ValueError, match=r"feddyn\.h"):
        state = handler.checkpoint_state()
        del state["feddyn.h"]
        resumed.load_checkpoint_state(state)


def test_a_round_with_every_client_dropped_keeps_model_and_h(tmp_path: Path) -> None:
    handler = FedDynServerHandler(
        TinySelector(), "t", None, 3, 4, 0.5, "cpu", 8, 0, nonfinite="drop", alpha_dyn=0.2
    )
    good = torch.linspace(-1, 1, 9)
    handler.load(FedAvgUplinkPackage(0, good, 1))
    handler.load(FedAvgUplinkPackage(1, -good, 2))
    model, h = serialize_model(handler.model).clone(), handler.h.clone()
    assert h.abs().max() > 0
    bad = torch.full((9,), float("nan"))
    handler.load(FedAvgUplinkPackage(2, bad, 1))
    handler.load(FedAvgUplinkPackage(3, bad, 1))
    assert handler.dropped == [2, 3] and handler.round == 2
    assert torch.equal(serialize_model(handler.model), model) and torch.equal(handler.h, h)

    # A client whose training ends in NaN keeps its previous g_i.
    state = ClientStateStore(tmp_path)
    state.save(1, {GRADIENT_KEY: torch.arange(9.0)})
    x, y = DATA[1]
    package = FedDynClientUpdate(0.2)(
        cid=1, model=TinySelector().select_model("t"), payload=FedAvgDownlinkPackage(bad),
        loader=DataLoader(TensorDataset(x, y), batch_size=2), device="cpu", epochs=1, lr=0.1,
        state=state,
    )  # fmt: skip
    assert package.model_parameters.isnan().all()
    stored = state.load(1)
    assert stored is not None and torch.equal(stored[GRADIENT_KEY], torch.arange(9.0))


def test_client_needs_state_and_checks_it(tmp_path: Path) -> None:
    x, y = DATA[0]
    common: dict[str, Any] = {
        "cid": 0, "model": TinySelector().select_model("t"), "device": "cpu", "epochs": 1,
        "lr": 0.1, "loader": DataLoader(TensorDataset(x, y), batch_size=1),
        "payload": FedAvgDownlinkPackage(torch.cat([W0.ravel(), B0])),
    }  # fmt: skip
    with pytest.raises(ValueError, match="state_dir"):
        FedDynClientUpdate(0.1)(**common)
    store_ = ClientStateStore(tmp_path)
    store_.save(0, {"other": torch.zeros(9)})
    with pytest.raises(ValueError, match=r"holds no 'feddyn\.gradient' tensor"):
        FedDynClientUpdate(0.1)(state=store_, **common)
    store_.save(0, {GRADIENT_KEY: torch.zeros(4)})
    with pytest.raises(ValueError, match=r"expected \(9,\)"):
        FedDynClientUpdate(0.1)(state=store_, **common)
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alpha_dyn"):
            FedDynClientUpdate(bad)
        with pytest.raises(ValueError, match="alpha_dyn"):
            FedDynServerHandler(TinySelector(), "t", None, 1, 4, 0.5, "cpu", 8, 0, alpha_dyn=bad)


def _digits_rounds(digits: Any, trainer_cls: type, state_dir: Path, **kw: Any) -> Any:
    dataset, selector = digits
    alpha = 0.5
    handler = FedDynServerHandler(
        selector, "mlp", dataset, 2, 6, 0.7, "cpu", 512, 7, alpha_dyn=alpha
    )
    trainer = trainer_cls(
        selector, "mlp", dataset, "cpu", 6, 2, 10, 0.1, 7, state_dir=state_dir,
        client_update=FedDynClientUpdate(alpha), **kw,
    )  # fmt: skip
    # Round 2 mixes clients with a g_i from round 1 (0, 4) and fresh ones (3, 1).
    for cids in ([4, 0, 5, 2], [0, 3, 4, 1]):
        trainer.local_process(handler.downlink_package(), cids)
        for package in trainer.uplink_package():
            handler.load(package)
    return handler


def test_batched_form_matches_the_per_client_step(digits: Any, tmp_path: Path) -> None:
    assert isinstance(FedDynClientUpdate(0.5).batched_step(), FedDynBatchedStep)
    alone = _digits_rounds(digits, FedAvgBaseClientTrainer, tmp_path / "a", progress=False)
    batched = _digits_rounds(digits, FedAvgBatchedClientTrainer, tmp_path / "b", batch_clients=3)

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    close(serialize_model(batched.model), serialize_model(alone.model))
    close(batched.h, alone.h)
    assert alone.h.abs().max() > 1e-3
    a, b = ClientStateStore(tmp_path / "a"), ClientStateStore(tmp_path / "b")
    assert a.clients() == b.clients() == [0, 1, 2, 3, 4, 5]
    for cid in a.clients():
        ga, gb = a.load(cid), b.load(cid)
        assert ga is not None and gb is not None
        close(gb[GRADIENT_KEY], ga[GRADIENT_KEY])


def test_padded_batched_clients_of_1_7_and_50_samples(tmp_path: Path) -> None:
    """A client with no step left must not move: the regulariser is masked too."""
    data = load_digits(seed=0)
    order = np.random.default_rng(0).permutation(len(data.train_y))
    starts = np.cumsum([0, 1, 7, 50])
    partition = Partition(tuple(np.sort(order[a:b]) for a, b in itertools.pairwise(starts)))
    dataset = write_store(tmp_path / "store", data, partition)
    selector = ZooModelSelector(data.in_shape, data.num_classes, seed=0)
    args = (selector, "mlp", dataset, "cpu", 3, 2, 10, 0.1, 7)
    server = FedDynServerHandler(selector, "mlp", dataset, 1, 3, 1.0, "cpu", 512, 7)
    payload = server.downlink_package()
    gen = torch.Generator().manual_seed(3)
    stored = {cid: 0.05 * torch.randn(server.layout.num_params, generator=gen) for cid in (0, 1)}
    for where in ("alone", "batched"):
        for cid, g in stored.items():
            ClientStateStore(tmp_path / where).save(cid, {GRADIENT_KEY: g})
    step = FedDynClientUpdate(0.5)
    batched = FedAvgBatchedClientTrainer(*args, state_dir=tmp_path / "batched", client_update=step)
    batched.local_process(payload, [0, 1, 2])
    together = batched.uplink_package()
    assert [(p.metadata or {}).get("steps") for p in together] == [2.0, 2.0, 10.0]
    for cid in range(3):
        alone = FedAvgBaseClientTrainer(
            *args, state_dir=tmp_path / "alone", client_update=step, progress=False
        )
        alone.local_process(payload, [cid])
        (package,) = alone.uplink_package()
        torch.testing.assert_close(
            together[cid].model_parameters, package.model_parameters, rtol=1e-5, atol=1e-6
        )
    a, b = ClientStateStore(tmp_path / "alone"), ClientStateStore(tmp_path / "batched")
    for cid in range(3):
        ga, gb = a.load(cid), b.load(cid)
        assert ga is not None and gb is not None
        torch.testing.assert_close(gb[GRADIENT_KEY], ga[GRADIENT_KEY], rtol=1e-5, atol=1e-6)


def test_the_setting_reaches_client_and_server(digits: Any) -> None:
    dataset, selector = digits
    config = SimulationConfig.from_mapping({"algorithm": "feddyn", "alpha_dyn": 0.25})
    assert FEDDYN.client_state_on_disk
    step = FEDDYN.client(config.options)
    assert isinstance(step, FedDynClientUpdate) and step.alpha_dyn == 0.25
    server = FEDDYN.server(selector, dataset, config)
    assert isinstance(server, FedDynServerHandler) and server.alpha_dyn == 0.25
    assert SimulationConfig.from_mapping({}).options["alpha_dyn"] == 0.01


# -- runs as a user starts them ----------------------------------------------------------

COMMAND = [
    "run", "--algorithm", "feddyn", "--clients", "20", "--sample-ratio", "0.5",
    "--rounds", "4", "--epochs", "1", "--seed", "5", "--no-progress", "--quiet",
]  # fmt: skip


def _run(out: Path, *flags: str) -> None:
    done = emberfl(*COMMAND, *flags, "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr


def _gradients(run_dir: Path) -> dict[int, torch.Tensor]:
    states = ClientStateStore(run_dir / "client_state")
    out = {}
    for cid in states.clients():
        stored = states.load(cid)
        assert stored is not None
        out[cid] = stored[GRADIENT_KEY].clone()
    return out


@pytest.mark.slow
def test_every_layout_gives_the_same_bits(
    tmp_path: Path, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    layouts = {
        "workers1": ["--workers", "1"],
        "workers2": ["--workers", "2"],
        "thread": ["--runtime", "thread"],
        "serial": ["--runtime", "serial"],
    }
    for name, flags in layouts.items():
        _run(tmp_path / name, *flags)
    models = {name: model_bytes(tmp_path / name) for name in layouts}
    differ = [name for name, model in models.items() if model != models["workers1"]]
    assert not differ, f"{differ} differ from the model of --workers 1"
    reference = _gradients(tmp_path / "workers1")
    assert len(reference) >= 10 and any(g.abs().max() > 0 for g in reference.values())
    for name in layouts:
        grads = _gradients(tmp_path / name)
        assert grads.keys() == reference.keys()
        assert all(torch.equal(grads[c], reference[c]) for c in grads), name


@pytest.mark.slow
def test_the_batched_runtime_runs_it(
    tmp_path: Path, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    _run(tmp_path / "batched", "--runtime", "batched", "--batch-clients", "4")
    _run(tmp_path / "serial", "--runtime", "serial")
    batched, serial = (
        store.load(tmp_path / n / "model.safetensors") for n in ("batched", "serial")
    )
    for key in serial:
        torch.testing.assert_close(batched[key], serial[key], rtol=1e-5, atol=1e-5)
    grads_b, grads_s = _gradients(tmp_path / "batched"), _gradients(tmp_path / "serial")
    assert grads_b.keys() == grads_s.keys() and len(grads_s) >= 10
    for cid, g in grads_s.items():
        torch.testing.assert_close(grads_b[cid], g, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_killed_run_resumes_bit_for_bit(
    tmp_path: Path, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    _run(tmp_path / "whole", "--workers", "1", "--checkpoint-every", "2")
    cut = tmp_path / "cut"
    # Killed once round 3 is trained and logged: its clients' g_i are rewritten, the
    # latest checkpoint is round 2's.
    crashed = emberfl(
        *COMMAND, "--workers", "1", "--checkpoint-every", "2", "--out", str(cut),
        env={CRASH_ENV: "metrics.row:3"},
    )  # fmt: skip
    assert crashed.returncode != 0 and not (cut / "model.safetensors").exists()
    assert (cut / "latest").read_text().strip() == "checkpoint-2"
    server = store.load(cut / "checkpoint-2" / "server.safetensors")
    assert server["feddyn.h"].abs().max() > 0
    done = emberfl("resume", str(cut), "--no-progress", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert model_bytes(cut) == model_bytes(tmp_path / "whole")
    whole, resumed = _gradients(tmp_path / "whole"), _gradients(cut)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[c], resumed[c]) for c in whole)


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["-1", "0", "nan", "inf", "abc"])
def test_a_bad_alpha_dyn_is_refused_by_name(tmp_path: Path, bad: str) -> None:
    done = emberfl(*COMMAND, "--alpha-dyn", bad, "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    if bad == "abc":
        # Not a number: argparse refuses it, after its usage lines, as for every flag.
        assert lines[-1].endswith("argument --alpha-dyn: invalid float value: 'abc'"), lines
    else:
        assert lines == [f"emberfl: error: alpha_dyn must be a finite number > 0, got {float(bad)}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_alpha_dyn_is_recorded_and_changes_the_run(
    tmp_path: Path, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    _run(tmp_path / "default", "--rounds", "2", "--runtime", "serial")
    _run(tmp_path / "strong", "--rounds", "2", "--runtime", "serial", "--alpha-dyn", "0.5")
    assert json.loads((tmp_path / "default" / "config.json").read_text())["alpha_dyn"] == 0.01
    assert json.loads((tmp_path / "strong" / "config.json").read_text())["alpha_dyn"] == 0.5
    assert model_bytes(tmp_path / "default") != model_bytes(tmp_path / "strong")
