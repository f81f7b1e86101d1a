"""The configuration of a run: :class:`SimulationConfig`, config files and defaults.

Every setting is declared once, as a :class:`~emberfl.core.setting.Setting`: the
general ones below (a field of :class:`SimulationConfig` with its help text, group and
check), each algorithm's in its module (:data:`emberfl.contrib.registry.ALGORITHM_SETTINGS`)
and the data sets' and partitioners' in :mod:`emberfl.data.registry`. :data:`SETTINGS`
gathers them; the config-file keys, the ``emberfl run`` flags, the checks and the
settings reference (:func:`settings_reference`, docs/settings.md) are all made from it.

Settings have the names of the ``emberfl run`` flags (``sample_ratio`` is
``--sample-ratio``). They come from the defaults, then a JSON or TOML file
(:func:`load_config_file`), then explicit values, each checked by
:meth:`SimulationConfig.from_mapping` and :meth:`SimulationConfig.validate`, which
raise :class:`ConfigError` naming the setting.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from emberfl.contrib.fedavg.server import SAMPLERS
from emberfl.contrib.registry import (
    ALGORITHM_SETTINGS,
    ALGORITHMS,
    BATCHED_ALGORITHMS,
    check_run_privacy,
)
from emberfl.core.checks import at_least, check_positive_number
from emberfl.core.setting import Check, ConfigError, Setting
from emberfl.data import DATA_SETTINGS, DATASET_NAMES, DATASETS, PARTITION_NAMES, dataset_spec
from emberfl.models import MODEL_NAMES
from emberfl.reproducibility import check_seed
from emberfl.runtimes.cpus import rank_cpus
from emberfl.runtimes.registry import RUNTIMES

__all__ = [
    "ALGORITHMS",
    "CONFIG_FILE",
    "DEFAULT_MODELS",
    "GROUPS",
    "PARTITIONS",
    "RESUME_SETTINGS",
    "RUNTIMES",
    "SETTINGS",
    "ConfigError",
    "SimulationConfig",
    "default_run_dir",
    "load_config_file",
    "settings_reference",
]

#: The ``--partition`` choices (the partitioner registry's names).
PARTITIONS: tuple[str, ...] = PARTITION_NAMES

#: The model each dataset gets when none is named (from the data set registry).
DEFAULT_MODELS: Mapping[str, str] = MappingProxyType(
    {name: spec.default_model for name, spec in DATASETS.items()}
)

#: The resolved configuration in a run directory.
CONFIG_FILE = "config.json"

#: The groups of settings, in the order ``--help`` and the reference show them.
GROUPS: tuple[str, ...] = (
    "experiment",
    "data",
    "model and training",
    "algorithm hyper-parameters",
    "privacy",
    "execution",
)


def _setting(default: Any, help: str, group: str, check: Check | None = None, **kw: Any) -> Any:
    """A general setting: a :class:`SimulationConfig` field whose name and type are the
    field's, and whose :class:`~emberfl.core.setting.Setting` the rest describes."""
    return field(
        default=default, metadata={"setting": {"help": help, "group": group, "check": check, **kw}}
    )


def _sample_ratio(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{what} must lie in (0, 1], got {value}")
    return float(value)


def _dataset(value: object, what: str) -> object:
    try:
        dataset_spec(str(value))
    except ValueError as exc:
        raise ValueError(str(exc).replace("dataset", what, 1)) from None
    return value


def _model(value: object, what: str) -> object:
    key = str(value).strip().lower().replace("-", "_")
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return value


def _seed(value: object, what: str) -> object:
    return check_seed(value, what)


def _device(value: object, what: str) -> object:
    device = str(value).strip().lower()
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"{what} {value!r} is not a torch device") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{what} {value!r} was asked for but CUDA is not available")
    return value


_EXP, _DATA, _TRAIN, _EXEC = GROUPS[0], GROUPS[1], GROUPS[2], GROUPS[5]


@dataclass(init=False)
class SimulationConfig:
    """Every setting of a run. The defaults are the quick start (FedAvg on digits).

    Names match the command line flags (``sample_ratio`` is ``--sample-ratio``).
    ``partition=None`` means ``iid``, except for data sets with their own client split
    (``synthetic``). ``model=None`` picks the data set's default model
    (:data:`DEFAULT_MODELS`). The settings of algorithms, data sets and partitioners
    are in :attr:`options` and read as attributes (``config.mu``); the constructor
    takes every setting by name: ``SimulationConfig(algorithm="fedprox", mu=0.1)``.
    """

    algorithm: str = _setting("fedavg", "federated algorithm", _EXP, choices=lambda: ALGORITHMS)
    seed: int = _setting(0, "seed of everything random (0 <= seed < 2**32)", _EXP, _seed)
    rounds: int = _setting(40, "communication rounds", _EXP, at_least(1))
    eval_every: int = _setting(
        1,
        "evaluate (and log a metrics row) every N rounds; the last round always",
        _EXP,
        at_least(1),
    )
    eval_batch_size: int = _setting(
        1024, "batch size of the server's evaluation", _EXP, at_least(1)
    )
    out: str | None = _setting(
        None,
        "run directory",
        _EXP,
        metavar="DIR",
        default_text="runs/<timestamp>-<algorithm>-<dataset>",
    )
    dataset: str = _setting("digits", "dataset", _DATA, _dataset, choices=lambda: DATASET_NAMES)
    data_dir: str | None = _setting(
        None,
        "directory of the dataset files (required for "
        + " and ".join(n for n, d in DATASETS.items() if d.needs_dir)
        + "".join(
            f"; {n} defaults to {d.default_dir}"
            for n, d in DATASETS.items()
            if d.default_dir is not None
        )
        + ")",
        _DATA,
        metavar="DIR",
    )
    partition: str | None = _setting(
        None,
        "how the training data is split among clients",
        _DATA,
        choices=lambda: PARTITIONS,
        default_text="iid; "
        + ", ".join(n for n, d in DATASETS.items() if d.natural_partition)
        + ": the data set's own per-client data",
    )
    model: str | None = _setting(
        None,
        "model",
        _TRAIN,
        _model,
        choices=lambda: MODEL_NAMES,
        default_text="per dataset: " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_MODELS.items()),
    )
    clients: int = _setting(100, "number of clients in the federation", _TRAIN, at_least(1))
    sample_ratio: float = _setting(
        0.1, "fraction of clients sampled per round (C)", _TRAIN, _sample_ratio
    )
    sampler: str = _setting(
        "fixed",
        "client sampling: int(clients x sample-ratio) distinct clients a round, or each "
        "client on its own with probability sample-ratio (Poisson, as client-level DP's "
        "analysis assumes; the cohort's size varies)",
        _TRAIN,
        choices=tuple(SAMPLERS),
    )
    epochs: int = _setting(5, "local epochs per round (E)", _TRAIN, at_least(1))
    batch_size: int = _setting(10, "local batch size (B)", _TRAIN, at_least(1))
    lr: float = _setting(0.2, "client learning rate (SGD)", _TRAIN, check_positive_number)
    nonfinite: str = _setting(
        "raise",
        "client updates holding NaN/Inf: stop with an error, or drop them with a warning",
        _TRAIN,
        choices=("raise", "drop"),
    )
    checkpoint_every: int | None = _setting(
        10,
        "write a checkpoint every N rounds, for `emberfl resume` (0: never)",
        _TRAIN,
        at_least(0),
        metavar="N",
        resumable=True,
    )
    workers: int | None = _setting(
        None,
        "parallel clients: worker processes (0 runs them in this process) or threads "
        "(default: this process's CPUs divided by --threads, at most the clients of a round; "
        "under torchrun the ranks of a node share its CPUs)",
        _EXEC,
        at_least(0),
        resumable=True,
    )
    threads: int = _setting(
        1,
        "torch threads of each client (its worker process, and this process during the "
        "run); the bits depend on it, not on the layout: runs agree bit for bit with any "
        "workers, ranks and runtime when they have the same --threads",
        _EXEC,
        at_least(1),
        metavar="N",
        resumable=True,
    )
    runtime: str = _setting(
        "process",
        "where clients run: worker processes, threads, serially in this process, or "
        "batched (groups of --batch-clients clients trained as one model; "
        + ", ".join(BATCHED_ALGORITHMS)
        + "; models without BatchNorm)",
        _EXEC,
        choices=lambda: RUNTIMES,
        resumable=True,
    )
    batch_clients: int = _setting(
        32, "clients trained together by --runtime batched", _EXEC, at_least(1), resumable=True
    )
    device: str = _setting("cpu", "torch device: cpu, cuda or cuda:N", _EXEC, _device)
    rank_timeout: float = _setting(
        10.0,
        "under torchrun: how long a silent rank (dead, stopped, its node lost) is "
        "waited for before every other rank stops with an error naming it; ranks that have "
        "not all joined the job within max(30, 6 x this) seconds stop too",
        _EXEC,
        check_positive_number,
        metavar="SECONDS",
        resumable=True,
    )
    progress: bool = _setting(
        True,
        "a per-round client progress bar",
        _EXEC,
        negative_flag="--no-progress",
        resumable=True,
        default_text="a bar when stderr is a terminal",
    )
    #: The values of the algorithms', data sets' and partitioners' settings, by name.
    options: dict[str, Any] = field(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        for setting in _GENERAL:
            object.__setattr__(self, setting.name, setting.default)
        self.options = {s.name: s.default for s in _OWNED}
        self._apply(values)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: the owned settings (config.mu).
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        options = self.__dict__.get("options")
        if options is not None and name in options:
            options[name] = value
        else:
            object.__setattr__(self, name, value)

    # -- building ------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every setting's name (the config-file keys)."""
        return tuple(SETTINGS)

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: SimulationConfig | None = None
    ) -> SimulationConfig:
        """``base`` (default: the defaults) with ``values`` applied.

        Keys may use dashes or underscores (``sample-ratio``). Unknown keys and values
        of the wrong type raise :class:`ConfigError`.
        """
        config = copy.deepcopy(base) if base is not None else cls()
        config._apply(values)
        return config

    def _apply(self, values: Mapping[str, Any]) -> None:
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            setting = SETTINGS.get(key)
            if setting is None:
                raise ConfigError(
                    f"unknown setting {raw_key!r}; valid settings are: "
                    + ", ".join(n.replace("_", "-") for n in SETTINGS)
                )
            setattr(self, key, setting.coerce(value))

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name (the algorithms' among them), as config.json has them."""
        return {name: getattr(self, name) for name in SETTINGS}

    # -- derived values --------------------------------------------------------------

    @property
    def dataset_key(self) -> str:
        """The data set's registry name (aliases such as ``fmnist`` resolved)."""
        try:
            return dataset_spec(self.dataset).name
        except ValueError:
            return self.dataset.strip().lower()

    @property
    def model_name(self) -> str:
        return self.model if self.model is not None else DEFAULT_MODELS[self.dataset_key]

    @property
    def partition_name(self) -> str:
        if self.partition is not None:
            return self.partition
        return "natural" if DATASETS[self.dataset_key].natural_partition else "iid"

    @property
    def workers_per_rank(self) -> int:
        """Clients this process trains at once: ``workers``, or as many as this rank's
        share of the CPUs holds at ``threads`` each, and no more than a round has
        clients. Results do not depend on it (each client's arithmetic depends only on
        ``threads``), so it may differ between machines, ranks and a resume."""
        if self.workers is not None:
            return self.workers
        return max(1, min(rank_cpus() // self.threads, self.clients_per_round))

    @property
    def clients_per_round(self) -> int:
        return int(self.clients * self.sample_ratio)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting: each setting's
        own check, then the rules that tie settings together."""
        for name, setting in SETTINGS.items():
            setting.validate(getattr(self, name))
        spec = dataset_spec(self.dataset)
        if spec.needs_dir and self.data_dir is None:
            raise ConfigError(
                f"dataset {spec.name!r} is read from files: give its directory (--data-dir)"
            )
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"data directory {self.data_dir} does not exist")
        if self.runtime == "batched" and self.algorithm not in BATCHED_ALGORITHMS:
            raise ConfigError(
                f"algorithm {self.algorithm!r} has no batched form (its client step runs per "
                f"client); --runtime batched runs {', '.join(BATCHED_ALGORITHMS)}: use the "
                "process, thread or serial runtime"
            )
        if self.runtime == "thread" and self.workers == 0:
            raise ConfigError("workers must be >= 1 with --runtime thread, got 0")
        if self.clients_per_round < 1:
            raise ConfigError(
                f"sample_ratio {self.sample_ratio} of {self.clients} clients selects no client "
                "per round; raise sample_ratio or clients"
            )
        try:
            check_run_privacy(self.algorithm, self)
        except (ImportError, ValueError) as exc:
            raise ConfigError(str(exc)) from None


def _general_settings() -> tuple[Setting, ...]:
    types = {"int": int, "float": float, "str": str, "bool": bool}
    found = []
    for f in dataclasses.fields(SimulationConfig):
        if "setting" not in f.metadata:
            continue
        type_text = str(f.type)
        found.append(
            Setting(
                f.name,
                types[type_text.split("|")[0].strip()],
                f.default,
                optional="None" in type_text,
                **f.metadata["setting"],
            )
        )
    return tuple(found)


_GENERAL: tuple[Setting, ...] = _general_settings()
_OWNED: tuple[Setting, ...] = (*DATA_SETTINGS, *ALGORITHM_SETTINGS)


def _all_settings() -> Mapping[str, Setting]:
    found: dict[str, Setting] = {}
    for setting in (*_GENERAL, *_OWNED):
        if setting.group not in GROUPS:
            raise AssertionError(f"setting {setting.name!r}: unknown group {setting.group!r}")
        if found.setdefault(setting.name, setting) is not setting:
            raise AssertionError(f"setting {setting.name!r} is declared twice")
    return MappingProxyType(found)


#: Every setting by name: the general ones, then the data sets' and partitioners',
#: then the algorithms'.
SETTINGS: Mapping[str, Setting] = _all_settings()

#: Settings a resumed run may change: they decide how the rounds run, not what they
#: compute (results are bitwise the same for any runtime and worker count; the batched
#: runtime agrees with the others within float rounding).
RESUME_SETTINGS: tuple[str, ...] = tuple(n for n, s in SETTINGS.items() if s.resumable)


def settings_reference() -> str:
    """The settings reference (docs/settings.md) in Markdown, made from :data:`SETTINGS`."""
    lines = [
        "# Settings",
        "",
        "Every setting of `emberfl run`, as a flag and as a key of a `--config` file (JSON,",
        "or TOML at the top level or under `[run]`) and of `SimulationConfig`. This page is",
        "made from the declarations (`python -m emberfl.config > docs/settings.md`); a",
        "test keeps it current.",
    ]
    for group in GROUPS:
        lines += ["", f"## {group.capitalize()}", "", "| key | flag | type | default | |"]
        lines.append("|---|---|---|---|---|")
        for name, s in SETTINGS.items():
            if s.group != group:
                continue
            flag = s.cli_flag or s.negative_flag or ""
            kind = s.type.__name__ + (" or null" if s.optional else "")
            text = s.described()
            choices = s.choice_list()
            if choices:
                text += " (one of: " + ", ".join(choices) + ")"
            if s.resumable:
                text += " [`emberfl resume` may change it]"
            cell = text.replace("|", "\\|")
            lines.append(f"| `{name}` | `{flag}` | {kind} | {s.shown_default()} | {cell} |")
    return "\n".join(lines) + "\n"


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings in a JSON (``.json``) or TOML (any other suffix) file.

    A TOML file may keep them at the top level or under a ``[run]`` table.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    data: Any
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON: {exc}") from None
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            try:
                import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]
            except ModuleNotFoundError:
                raise ConfigError(
                    f"{p}: reading TOML on Python 3.10 needs the 'tomli' package; "
                    "install it or use a .json config"
                ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("run"), dict) and len(data) == 1:
            data = data["run"]
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a table of settings, got {type(data).__name__}")
    return data


def default_run_dir(config: SimulationConfig, parent: str | os.PathLike[str] = "runs") -> Path:
    """``<parent>/<timestamp>-<algorithm>-<dataset>``, made unique with a suffix."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(parent) / f"{stamp}-{config.algorithm}-{config.dataset_key}"
    candidate = base
    n = 1
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate


if __name__ == "__main__":
    sys.stdout.write(settings_reference())
