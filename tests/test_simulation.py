"""The experiment runner: configuration, run directory, algorithms and partitions."""

from __future__ import annotations

import datetime
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from emberfl import config as config_module
from emberfl import store
from emberfl.contrib.registry import algorithm_spec
from emberfl.metrics import read_metrics
from emberfl.models import create_model
from emberfl.simulation import (
    ALGORITHMS,
    RUNTIMES,
    ConfigError,
    Simulation,
    SimulationConfig,
    default_run_dir,
    load_config_file,
    run_simulation,
)

# Bitwise comparisons need one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

TINY: dict[str, Any] = {
    "clients": 6,
    "sample_ratio": 0.5,
    "rounds": 2,
    "epochs": 2,
    "lr": 0.1,
    "runtime": "thread",
    "workers": 2,
    "threads": 1,
    "progress": False,
}


def test_defaults_are_the_quick_start() -> None:
    config = SimulationConfig()
    config.validate()
    assert (config.algorithm, config.dataset, config.clients, config.threads) == (
        "fedavg",
        "digits",
        100,
        1,
    )
    assert config.model_name == "mlp" and config.partition_name == "iid"
    assert SimulationConfig(dataset="synthetic").partition_name == "natural"
    assert SimulationConfig(dataset="mnist").model_name == "2nn"
    assert SimulationConfig(dataset="cifar10").model_name == "cifar_cnn"


def test_default_workers_fill_this_ranks_cpus_at_the_thread_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import emberfl.runtimes.cpus as runtime

    monkeypatch.setattr(runtime, "available_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert SimulationConfig().workers_per_rank == 10  # no more than a round's clients
    assert SimulationConfig(clients=1000).workers_per_rank == 16
    assert SimulationConfig(clients=1000, threads=4).workers_per_rank == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # ranks of one node share its CPUs
    assert SimulationConfig(clients=1000).workers_per_rank == 4
    assert SimulationConfig(clients=1000, workers=3).workers_per_rank == 3
    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    assert SimulationConfig(clients=1000, threads=4).workers_per_rank == 1


def test_from_mapping_accepts_dashes_and_checks_types() -> None:
    config = SimulationConfig.from_mapping({"sample-ratio": 0.5, "rounds": 3.0, "lr": 1})
    assert config.sample_ratio == 0.5 and config.rounds == 3 and config.lr == 1.0
    assert isinstance(config.rounds, int) and isinstance(config.lr, float)
    layered = SimulationConfig.from_mapping({"epochs": 7}, config)
    assert (layered.epochs, layered.rounds) == (7, 3)
    with pytest.raises(ConfigError, match=r"unknown setting .epoch.*epochs"):
        SimulationConfig.from_mapping({"epoch": 1})
    with pytest.raises(ConfigError, match="'rounds' must be an integer"):
        SimulationConfig.from_mapping({"rounds": 2.5})
    with pytest.raises(ConfigError, match="'lr' must be a number"):
        SimulationConfig.from_mapping({"lr": "fast"})
    with pytest.raises(ConfigError, match="'progress' must be true or false"):
        SimulationConfig.from_mapping({"progress": 1})
    with pytest.raises(ConfigError, match="cannot be null"):
        SimulationConfig.from_mapping({"clients": None})


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"sample_ratio": 0.0}, "sample_ratio must lie in"),
        ({"sample_ratio": 1.5}, "sample_ratio must lie in"),
        ({"clients": 10, "sample_ratio": 0.05}, "selects no client"),
        ({"clients": 0}, "clients must be >= 1"),
        ({"algorithm": "fedsgd"}, "unknown algorithm 'fedsgd'"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"partition": "natural"}, "unknown partition"),
        ({"model": "vgg"}, "unknown model 'vgg'"),
        ({"dataset": "mnist"}, "--data-dir"),
        ({"dataset": "mnist", "data_dir": "/nonexistent/mnist"}, "does not exist"),
        ({"lr": 0.0}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"mu": -1.0}, "mu must be"),
        ({"beta1": 1.0}, "beta1 must lie"),
        ({"seed": -1}, r"seed must be an int in \[0, 2\*\*32\), got -1"),
        ({"seed": 2**32}, r"seed must be an int in \[0, 2\*\*32\)"),
        ({"runtime": "thread", "workers": 0}, "workers must be >= 1"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"device": "tpu:0"}, "device"),
    ],
)
def test_invalid_settings_are_named(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SimulationConfig(**settings).validate()


def test_config_files_json_and_toml(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"rounds": 3, "sample-ratio": 0.5}))
    assert load_config_file(tmp_path / "a.json") == {"rounds": 3, "sample-ratio": 0.5}
    (tmp_path / "b.toml").write_text('algorithm = "fedprox"\nmu = 0.1\n')
    assert load_config_file(tmp_path / "b.toml") == {"algorithm": "fedprox", "mu": 0.1}
    (tmp_path / "c.toml").write_text("[run]\nrounds = 4\n")
    assert load_config_file(tmp_path / "c.toml") == {"rounds": 4}
    (tmp_path / "bad.json").write_text("{rounds: 3")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config_file(tmp_path / "bad.json")
    (tmp_path / "bad.toml").write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config_file(tmp_path / "bad.toml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="table of settings"):
        load_config_file(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


def test_default_run_dir_is_unique(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fixed clock: two calls straddling a second boundary would get different
    # timestamps, and then the suffix under test would not be needed.
    fixed = datetime.datetime(2026, 1, 2, 3, 4, 5)

    class _Clock(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:
            return fixed

    monkeypatch.setattr(config_module, "datetime", types.SimpleNamespace(datetime=_Clock))
    config = SimulationConfig(algorithm="scaffold")
    first = default_run_dir(config, tmp_path)
    assert first.parent == tmp_path and first.name.endswith("-scaffold-digits")
    first.mkdir()
    second = default_run_dir(config, tmp_path)
    assert second != first and second.name.startswith(first.name)


def test_run_writes_config_metrics_and_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    seen: list[int] = []
    result = run_simulation(TINY, out=str(out), on_round=lambda m: seen.append(m.round))
    assert result.run_dir == out and seen == [1, 2]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "mlp" and config["rounds"] == 2 and config["partition"] == "iid"
    metrics = read_metrics(out)
    assert metrics["round"].tolist() == [1.0, 2.0]
    assert metrics["accuracy"][-1] == pytest.approx(result.final_accuracy)
    assert result.final_accuracy > 0.5
    assert (metrics["num_clients"] == 3).all()
    assert (metrics["bytes_up"] > 0).all() and (metrics["bytes_down"] > 0).all()
    assert (metrics["client_train_seconds_max"] >= metrics["client_train_seconds_mean"]).all()
    assert (metrics["train_loss"] > 0).all() and (metrics["dropped"] == 0).all()
    tensors = store.load(out / "model.safetensors")
    model = create_model("mlp", (1, 8, 8), 10)
    model.load_state_dict(tensors)
    assert store.open_file(out / "model.safetensors").metadata["round"] == "2"
    # The run directory is not reused by accident.
    with pytest.raises(ConfigError, match="already holds a run"):
        run_simulation(TINY, out=str(out))


def test_reruns_are_bitwise_identical(tmp_path: Path) -> None:
    a = run_simulation(TINY, out=str(tmp_path / "a"), seed=5)
    b = run_simulation(TINY, out=str(tmp_path / "b"), seed=5, runtime="serial")
    c = run_simulation(TINY, out=str(tmp_path / "c"), seed=6)
    ma, mb, mc = (store.load(r.run_dir / "model.safetensors") for r in (a, b, c))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert not all(torch.equal(ma[k], mc[k]) for k in ma)


def test_eval_every_logs_every_nth_and_the_last_round(tmp_path: Path) -> None:
    result = run_simulation(TINY, out=str(tmp_path / "r"), rounds=5, eval_every=2)
    assert [m.round for m in result.metrics] == [2, 4, 5]
    assert read_metrics(tmp_path / "r")["round"].tolist() == [2.0, 4.0, 5.0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_and_learns(algorithm: str, tmp_path: Path) -> None:
    extra = {"server_lr": 0.1} if algorithm in ("fedadam", "fedyogi", "fedadagrad") else {}
    result = run_simulation(TINY, out=str(tmp_path / "r"), algorithm=algorithm, **extra)
    assert result.final_accuracy > 0.4
    state = tmp_path / "r" / "client_state"
    if algorithm_spec(algorithm).client_state_on_disk:  # SCAFFOLD, FedDyn, Ditto
        assert len(list(state.glob("*.safetensors"))) >= 3
    else:
        assert not state.exists()


@pytest.mark.parametrize(
    "settings",
    [
        {"partition": "dirichlet", "alpha": 0.5},
        {"partition": "shards", "shards_per_client": 2},
        {"partition": "quantity", "sigma": 0.5},
        {"dataset": "synthetic", "clients": 5, "sample_ratio": 0.4},
        {"runtime": "process", "workers": 0},
    ],
)
def test_partitions_datasets_and_runtimes(settings: dict[str, Any], tmp_path: Path) -> None:
    result = run_simulation(TINY, out=str(tmp_path / "r"), rounds=1, **settings)
    assert len(result.metrics) == 1 and 0.0 <= result.final_accuracy <= 1.0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    if settings.get("dataset") == "synthetic":
        assert config["partition"] == "natural" and config["model"] == "logreg"


def test_bad_partition_settings_are_config_errors(tmp_path: Path) -> None:
    with (
        Simulation(
            SimulationConfig.from_mapping({**TINY, "partition": "shards", "clients": 2000}),
            tmp_path / "r",
        ) as sim,
        pytest.raises(ConfigError, match="cannot partition digits"),
    ):
        sim.prepare()
    assert not (tmp_path / "r").exists()


def test_mnist_with_the_2nn(tmp_path: Path, mnist_dir: Path) -> None:
    result = run_simulation(
        TINY,
        out=str(tmp_path / "r"),
        dataset="mnist",
        data_dir=str(mnist_dir),
        clients=100,
        sample_ratio=0.02,
        rounds=1,
        epochs=1,
        partition="shards",
    )
    assert result.metrics[0].accuracy > 0.15
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"] == "2nn"


def test_the_registry_names_every_algorithm(tmp_path: Path) -> None:
    from emberfl.contrib import registry
    from emberfl.contrib.fedavg import FedAvgBaseClientTrainer
    from emberfl.contrib.fedprox import FedProxClientUpdate
    from emberfl.models import ZooModelSelector

    assert ALGORITHMS == tuple(registry.ALGORITHM_SPECS) == registry.ALGORITHMS
    assert set(RUNTIMES) == {"process", "thread", "serial", "batched"}
    with pytest.raises(ValueError, match="unknown algorithm 'fedsgd'; choose one of: fedavg"):
        registry.algorithm_spec("fedsgd")
    config = SimulationConfig(algorithm="fedprox", mu=0.25, runtime="serial")
    with pytest.raises(ValueError, match="unknown runtime 'gpu'"):
        registry.make_client_trainer(
            "fedprox", "gpu", None, None, config, state_dir=tmp_path / "state"
        )
    selector = ZooModelSelector((1, 8, 8), 10)
    trainer = registry.make_client_trainer(
        "fedprox", "serial", selector, None, config, state_dir=tmp_path / "state"
    )
    # The serial runtime itself, running FedProx's step with the configured mu.
    assert type(trainer) is FedAvgBaseClientTrainer
    assert isinstance(trainer.client_update, FedProxClientUpdate)
    assert trainer.client_update.mu == 0.25
