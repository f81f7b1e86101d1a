"""Ditto: the personal and global models against a plain-torch implementation of the
paper's rule, the held-out split, and ``emberfl run --algorithm ditto`` end to end
(layouts, resume, metrics columns, the plot band, settings, the batched runtime)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from cli_run import emberfl
from emberfl.cli import main
from emberfl.contrib.ditto import DITTO, PERSONAL_KEY, holdout_split, split_loader
from emberfl.contrib.fedavg import (
    FedAvgBaseClientTrainer,
    FedAvgDownlinkPackage,
    FedAvgPartitionType,
)
from emberfl.core import ClientContext, client_scope, serialize_model
from emberfl.core.client_state import ClientStateStore
from emberfl.data.mapped import MappedArrayDataset, MappedDataLoader
from emberfl.metrics import read_metrics
from emberfl.plot import plot_runs, runs_figure
from emberfl.reproducibility import client_rng_suite

# Bitwise comparisons need one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

ModelBytes = Callable[[Path], dict[str, bytes]]

# -- a direct implementation on a tiny problem -----------------------------------------

SIZES = (10, 7, 1)  # the last client has no held-out part (fewer than two samples)
W0 = torch.tensor([[0.2, -0.1, 0.05, 0.3], [0.0, 0.1, -0.2, 0.1], [-0.3, 0.2, 0.1, -0.05]])
B0 = torch.tensor([0.01, -0.02, 0.0])


def _client_data(cid: int) -> TensorDataset:
    g = torch.Generator().manual_seed(100 + cid)
    x = torch.randn(SIZES[cid], 4, generator=g)
    # Each client labels by its own rule: personal models have something to learn.
    y = (x[:, cid % 4] > 0).long() + (cid == 1)
    return TensorDataset(x, y)


class TinyData:
    """Three hand-made clients; batches of 3, shuffled by the loader's generator."""

    def get_dataset(self, type_: Any, cid: int | None) -> Dataset[Any]:
        if type_ == FedAvgPartitionType.TEST:
            return _client_data(0)
        assert cid is not None
        return _client_data(cid)

    def set_dataset(self, type_: Any, cid: int | None, dataset: Dataset[Any]) -> None:
        raise NotImplementedError

    def get_dataloader(
        self, type_: Any, cid: int | None, batch_size: int | None, generator: Any
    ) -> DataLoader[Any]:
        train = type_ == FedAvgPartitionType.TRAIN
        return DataLoader(
            self.get_dataset(type_, cid), batch_size=batch_size, shuffle=train, generator=generator
        )


class TinySelector:
    def select_model(self, name: str) -> nn.Module:
        model = nn.Linear(4, 3)
        with torch.no_grad():
            model.weight.copy_(W0)
            model.bias.copy_(B0)
        return model


def _sgd(
    start: list[torch.Tensor],
    batches: list[list[torch.Tensor]],
    lr: float,
    anchor: list[torch.Tensor] | None = None,
    lam: float = 0.0,
) -> list[torch.Tensor]:
    """Plain SGD on mean cross-entropy of a linear model, plus ``lam * (v - anchor)``."""
    w, b = (t.clone() for t in start)
    for x, y in batches:
        w.requires_grad_(True)
        b.requires_grad_(True)
        gw, gb = torch.autograd.grad(F.cross_entropy(x @ w.T + b, y), [w, b])
        with torch.no_grad():
            if anchor is not None:
                gw = gw + lam * (w - anchor[0])
                gb = gb + lam * (b - anchor[1])
            w, b = w - lr * gw, b - lr * gb
    return [w.detach(), b.detach()]


def _accuracy(params: list[torch.Tensor], data: Dataset[Any], positions: torch.Tensor) -> float:
    x, y = (t[positions] for t in data.tensors)  # type: ignore[attr-defined]
    return float(((x @ params[0].T + params[1]).argmax(1) == y).float().mean())


def test_one_run_matches_a_direct_implementation(tmp_path: Path) -> None:
    seed, rounds, epochs, personal_epochs, lr, lam, holdout = 7, 3, 2, 2, 0.3, 0.5, 0.2
    options = {
        "ditto_lambda": lam,
        "ditto_personal_epochs": personal_epochs,
        "ditto_holdout": holdout,
    }
    # Built through the registry entry, as `emberfl run` builds them.
    settings = SimpleNamespace(
        model_name="tiny", rounds=rounds, clients=3, sample_ratio=1.0, device="cpu",
        eval_batch_size=16, seed=seed, nonfinite="raise", sampler="fixed", options=options,
    )  # fmt: skip
    data = TinyData()
    server = DITTO.server(TinySelector(), data, settings)  # type: ignore[arg-type]
    trainer = FedAvgBaseClientTrainer(
        TinySelector(), "tiny", data, "cpu", 3, epochs, 3, lr, seed,
        state_dir=tmp_path / "state", client_update=DITTO.client(options), progress=False,
    )  # fmt: skip

    w = [W0.clone(), B0.clone()]
    personal: dict[int, list[torch.Tensor]] = {}
    for r in range(rounds):
        cids = server.sample_clients()
        assert cids == [0, 1, 2]
        trainer.local_process(server.downlink_package(), cids)
        uplinks = trainer.uplink_package()
        for package in uplinks:
            server.load(package)

        models, sizes, accs, global_accs = [], [], {}, {}
        for cid in cids:
            dataset = _client_data(cid)
            train, held = holdout_split(len(dataset), holdout, seed, cid)
            # The batch order comes from the client's (seed, cid, round) generator:
            # the global epochs first, then the personal ones, on the train part only.
            loader = DataLoader(
                Subset(dataset, train.tolist()), batch_size=3, shuffle=True,
                generator=client_rng_suite(seed, cid, r).torch_cpu,
            )  # fmt: skip
            global_batches = [b for _ in range(epochs) for b in loader]
            personal_batches = [b for _ in range(personal_epochs) for b in loader]
            models.append(_sgd(w, global_batches, lr))
            sizes.append(len(train))
            personal[cid] = _sgd(personal.get(cid, w), personal_batches, lr, w, lam)
            if held.numel():
                accs[cid] = _accuracy(personal[cid], dataset, held)
                global_accs[cid] = _accuracy(w, dataset, held)
        total = sum(sizes)
        w = [sum(n * m[i] for n, m in zip(sizes, models, strict=True)) / total for i in (0, 1)]

        torch.testing.assert_close(server.model.weight.detach(), w[0])
        torch.testing.assert_close(server.model.bias.detach(), w[1])
        state = ClientStateStore(tmp_path / "state")
        for cid in cids:
            stored = state.load(cid)
            assert stored is not None
            torch.testing.assert_close(
                stored[PERSONAL_KEY], torch.cat([p.ravel() for p in personal[cid]])
            )
        by_cid = {p.cid: p for p in uplinks}
        assert [by_cid[c].data_size for c in cids] == sizes
        assert "personal_acc" not in (by_cid[2].metadata or {})  # no held-out part
        for cid, acc in accs.items():
            meta = by_cid[cid].metadata or {}
            assert meta["personal_acc"] == pytest.approx(acc)
            assert meta["global_local_acc"] == pytest.approx(global_accs[cid])
        summary = server.get_summary()
        assert summary["personal_acc_mean"] == pytest.approx(np.mean(list(accs.values())))
        assert summary["personal_acc_std"] == pytest.approx(np.std(list(accs.values())))
        assert summary["global_local_acc_mean"] == pytest.approx(
            np.mean(list(global_accs.values()))
        )
    # The personal models moved away from the global one (lambda is not infinite).
    assert not torch.allclose(personal[0][0], w[0])


def test_holdout_split_is_fixed_per_client_and_loaders_keep_the_client_generator(
    tmp_path: Path,
) -> None:
    train, held = holdout_split(50, 0.2, 3, 4)
    assert len(held) == 10 and len(train) == 40
    assert sorted(torch.cat([train, held]).tolist()) == list(range(50))
    again = holdout_split(50, 0.2, 3, 4)
    assert torch.equal(again[1], held) and torch.equal(again[0], train)
    assert not torch.equal(holdout_split(50, 0.2, 3, 5)[1], held)  # another client
    assert not torch.equal(holdout_split(50, 0.2, 4, 4)[1], held)  # another seed
    assert [len(holdout_split(n, 0.2, 0, 0)[1]) for n in (0, 1, 2, 3, 9)] == [0, 0, 1, 1, 1]

    features = torch.arange(100, dtype=torch.float32).reshape(50, 2)
    dataset = MappedArrayDataset(features, torch.arange(50) % 3)
    g = torch.Generator().manual_seed(11)
    loader = MappedDataLoader(dataset, batch_size=8, shuffle=True, generator=g)
    train_loader, held_loader = split_loader(loader, 0.2, 3, 4)
    assert held_loader is not None
    before = g.get_state()
    held_rows = torch.cat([x[:, 0] / 2 for x, _ in held_loader]).long()
    assert torch.equal(held_rows, held)  # in order, and the client generator untouched
    assert torch.equal(g.get_state(), before)
    assert train_loader.batch_size == 8 and train_loader.generator is g
    seen = torch.cat([x[:, 0] / 2 for x, _ in train_loader]).long()
    assert sorted(seen.tolist()) == train.tolist() and not torch.equal(seen, train)  # shuffled
    assert not torch.equal(g.get_state(), before)  # by the client's generator

    # The client step (as the registry builds it) trains on the train part only.
    model = nn.Linear(2, 3)
    step = DITTO.client({"ditto_lambda": 0.1, "ditto_personal_epochs": 1, "ditto_holdout": 0.2})
    with client_scope(ClientContext(cid=4, round=0, seed=3, device="cpu")):
        package = step(
            cid=4, model=model, payload=FedAvgDownlinkPackage(serialize_model(model)),
            loader=MappedDataLoader(dataset, batch_size=8, shuffle=True, generator=g),
            device="cpu", epochs=1, lr=0.1, state=ClientStateStore(tmp_path),
        )  # fmt: skip
    assert package.data_size == 40 and (package.metadata or {})["personal_steps"] == 5
    assert ClientStateStore(tmp_path).clients() == [4]


def test_bad_settings_exit_2_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flag, value in [
        ("--ditto-lambda", "-1"),
        ("--ditto-lambda", "nan"),
        ("--ditto-personal-epochs", "0"),
        ("--ditto-holdout", "0"),
        ("--ditto-holdout", "1"),
    ]:
        argv = ["run", "--algorithm", "ditto", "--rounds", "1", "--quiet", flag, value]
        assert main([*argv, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag[2:].replace("-", "_") in err, err


# -- end to end -------------------------------------------------------------------------

COMMAND = [
    "run", "--algorithm", "ditto", "--clients", "20", "--sample-ratio", "0.5",
    "--rounds", "4", "--epochs", "1", "--seed", "5", "--lr", "0.05", "--no-progress",
    "--quiet", "--checkpoint-every", "2",
]  # fmt: skip
PERSONAL_COLUMNS = (
    "personal_acc_mean",
    "personal_acc_std",
    "global_local_acc_mean",
    "global_local_acc_std",
)


def _run(out: Path, *flags: str) -> None:
    done = emberfl(*COMMAND, *flags, "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr


def _state_bytes(run_dir: Path) -> dict[str, bytes]:
    files = sorted((run_dir / "client_state").glob("*.safetensors"))
    assert files, f"{run_dir} has no client_state files"
    return {f.name: f.read_bytes() for f in files}


def _personal_rows(run_dir: Path, rounds: tuple[int, ...] = (1, 2, 3, 4)) -> dict[str, list[float]]:
    table = read_metrics(run_dir)
    keep = np.isin(table["round"], rounds)
    return {k: table[k][keep].tolist() for k in PERSONAL_COLUMNS}


LAYOUTS = {
    "workers1": ["--workers", "1"],
    "workers2": ["--workers", "2"],
    "thread": ["--runtime", "thread"],
    # Rounds 1 and 3 are not evaluated here: their personal updates happen all the same.
    "serial": ["--runtime", "serial", "--eval-every", "2"],
}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ditto_layouts")
    for name, flags in LAYOUTS.items():
        _run(root / name, *flags)
    return {name: root / name for name in LAYOUTS}


@pytest.mark.slow
def test_every_layout_gives_the_same_models(
    layout_runs: dict[str, Path], model_bytes: ModelBytes
) -> None:
    ref = layout_runs["workers1"]
    assert len(_state_bytes(ref)) > 10  # personal models of the clients sampled so far
    for name, run_dir in layout_runs.items():
        assert model_bytes(run_dir) == model_bytes(ref), name
        assert _state_bytes(run_dir) == _state_bytes(ref), name
        rounds = (2, 4) if name == "serial" else (1, 2, 3, 4)
        assert _personal_rows(run_dir, rounds) == _personal_rows(ref, rounds), name


@pytest.mark.slow
def test_metrics_have_personal_columns_and_plot_with_a_band(
    layout_runs: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = layout_runs["workers1"]
    table = read_metrics(run_dir)
    assert table["round"].tolist() == [1.0, 2.0, 3.0, 4.0]
    for column in PERSONAL_COLUMNS:
        values = table[column]
        assert np.all((values >= 0) & (values <= 1)), (column, values)
    assert np.all(table["personal_acc_std"] > 0)
    # Personal models fit their clients: better than the global model was on round 1.
    assert table["personal_acc_mean"][-1] > table["global_local_acc_mean"][0]
    assert read_metrics(layout_runs["serial"])["round"].tolist() == [2.0, 4.0]

    out = plot_runs([run_dir], tmp_path / "personal.png", metric="personal_acc_mean")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = emberfl(
        "plot", str(run_dir), "-o", str(tmp_path / "cli.png"), "--metric", "personal_acc_mean"
    )
    assert done.returncode == 0 and (tmp_path / "cli.png").is_file(), done.stderr
    (ax,) = runs_figure([run_dir], "personal_acc_mean").axes
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    mean, std = table["personal_acc_mean"], table["personal_acc_std"]
    assert ys.min() == pytest.approx((mean - std).min())
    assert ys.max() == pytest.approx((mean + std).max())
    assert not runs_figure([run_dir], "accuracy").axes[0].collections  # no _std: no band


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_bits(
    layout_runs: dict[str, Path], tmp_path: Path, model_bytes: ModelBytes
) -> None:
    run_dir = tmp_path / "cut"
    # Killed at the 5th uplink of round 3, after the checkpoint of round 2: some
    # clients of round 3 have already stored new personal models by then.
    done = emberfl(
        *COMMAND,
        "--workers",
        "1",
        "--out",
        str(run_dir),
        env={"EMBERFL_CRASH_AT": "round.client:25"},
    )
    assert done.returncode != 0 and not (run_dir / "model.safetensors").exists(), done.stderr
    assert (run_dir / "latest").read_text().strip() == "checkpoint-2"
    done = emberfl("resume", str(run_dir), "--no-progress", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    whole = layout_runs["workers1"]
    assert model_bytes(run_dir) == model_bytes(whole)
    assert _state_bytes(run_dir) == _state_bytes(whole)
    assert _personal_rows(run_dir) == _personal_rows(whole)


@pytest.mark.slow
def test_settings_reach_the_algorithm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_bytes: ModelBytes
) -> None:
    argv = [*COMMAND, "--rounds", "2", "--runtime", "serial", "--ditto-lambda", "0.5"]
    argv += ["--ditto-holdout", "0.3"]
    assert main([*argv, "--ditto-personal-epochs", "3", "--out", str(tmp_path / "three")]) == 0
    config = json.loads((tmp_path / "three" / "config.json").read_text())
    assert (config["ditto_lambda"], config["ditto_personal_epochs"]) == (0.5, 3)
    assert config["ditto_holdout"] == 0.3
    step = DITTO.client(config)
    assert (step.ditto_lambda, step.personal_epochs, step.holdout) == (0.5, 3, 0.3)  # type: ignore[attr-defined]
    # The personal epochs change the personal models only, never the global one.
    assert main([*argv, "--ditto-personal-epochs", "1", "--out", str(tmp_path / "one")]) == 0
    assert model_bytes(tmp_path / "three") == model_bytes(tmp_path / "one")
    assert _state_bytes(tmp_path / "three") != _state_bytes(tmp_path / "one")
    three, one = read_metrics(tmp_path / "three"), read_metrics(tmp_path / "one")
    assert three["personal_acc_mean"].tolist() != one["personal_acc_mean"].tolist()
    assert three["global_local_acc_mean"].tolist() == one["global_local_acc_mean"].tolist()
    capsys.readouterr()

    # The batched runtime cannot hold two models per client: it refuses the step.
    assert DITTO.client(config).batched_step() is None
    status = main([*argv, "--runtime", "batched", "--out", str(tmp_path / "batched")])
    message = capsys.readouterr().err
    assert status == 2 and message.count("\n") == 1, message
    assert "'ditto' has no batched form" in message, message
    assert not (tmp_path / "batched" / "metrics.csv").exists()
