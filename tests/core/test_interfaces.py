"""The BlazeFL 3.0 names and signatures, and the default method behaviour."""

from __future__ import annotations

import importlib
import inspect
from enum import Enum

import pytest
import torch

import emberfl.core as core
from emberfl.core import BaseServerHandler, ModelSelector


def test_blazefl_core_names_are_exported() -> None:
    blazefl_names = {
        "BaseClientTrainer",
        "FilteredDataset",
        "ProcessPoolClientTrainer",
        "ThreadPoolClientTrainer",
        "ModelSelector",
        "PartitionedDataset",
        "BaseServerHandler",
        "serialize_model",
        "deserialize_model",
        "process_tensors_in_object",
        "reconstruct_from_shared_memory",
        "SHMHandle",
    }
    assert blazefl_names <= set(core.__all__)


# Where each public name of emberfl.core is defined: contrib, data and simulation
# import these from the package, never from its submodules.
_EXPORTS = {
    "BaseClientTrainer": "emberfl.core.client_trainer",
    "BaseServerHandler": "emberfl.core.server_handler",
    "ClientContext": "emberfl.core.context",
    "ClientError": "emberfl.core.errors",
    "ClientTimeoutError": "emberfl.core.errors",
    "FilteredDataset": "emberfl.core.partitioned_dataset",
    "FoldTerm": "emberfl.core.fold",
    "FoldedRound": "emberfl.core.fold",
    "IPCMode": "emberfl.core.ipc",
    "ModelSelector": "emberfl.core.model_selector",
    "PackageError": "emberfl.core.packages",
    "PartitionedDataset": "emberfl.core.partitioned_dataset",
    "ProcessPoolClientTrainer": "emberfl.runtimes.process.trainer",
    "SHMHandle": "emberfl.core.utils",
    "ThreadPoolClientTrainer": "emberfl.runtimes.thread",
    "UplinkFold": "emberfl.core.fold",
    "WorkerCrashedError": "emberfl.core.errors",
    "accept_ipc_mode": "emberfl.core.ipc",
    "available_cpus": "emberfl.runtimes.cpus",
    "client_scope": "emberfl.core.context",
    "current_client": "emberfl.core.context",
    "deliver_uplink": "emberfl.core.client_trainer",
    "deserialize_model": "emberfl.core.utils",
    "load_package": "emberfl.core.packages",
    "process_tensors_in_object": "emberfl.core.utils",
    "reconstruct_from_shared_memory": "emberfl.core.utils",
    "save_package": "emberfl.core.packages",
    "serialize_model": "emberfl.core.utils",
}


def test_all_lists_exactly_the_public_names_sorted() -> None:
    assert core.__all__ == sorted(_EXPORTS)


@pytest.mark.parametrize("name", sorted(_EXPORTS))
def test_each_export_is_the_object_defined_in_its_module(name: str) -> None:
    module = importlib.import_module(_EXPORTS[name])
    exported = getattr(core, name)
    assert exported is getattr(module, name)
    assert exported.__module__ == _EXPORTS[name]
    assert name in module.__all__


def _params(fn: object) -> list[tuple[str, str]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind.name) for p in sig.parameters.values()]


def test_method_signatures_match_blazefl() -> None:
    pos = "POSITIONAL_OR_KEYWORD"
    pp = core.ProcessPoolClientTrainer
    assert _params(pp.worker) == [
        ("config", pos),
        ("payload", pos),
        ("device", pos),
        ("stop_event", pos),
        ("shm_buffer", "KEYWORD_ONLY"),
    ]
    assert isinstance(inspect.getattr_static(pp, "worker"), staticmethod)
    assert _params(pp.local_process) == [("self", pos), ("payload", pos), ("cid_list", pos)]
    assert _params(pp.get_client_config) == [("self", pos), ("cid", pos)]
    assert _params(pp.get_client_device) == [("self", pos), ("cid", pos)]
    assert _params(pp.progress_fn) == [("self", pos), ("it", pos)]
    assert _params(pp.prepare_uplink_package_buffer) == [("self", pos)]
    assert _params(pp.convert_buffer_to_uplink) == [("self", pos), ("buffer", pos)]
    assert _params(pp.shutdown) == [("self", pos)]
    tp = core.ThreadPoolClientTrainer
    assert _params(tp.worker) == [
        ("self", pos),
        ("cid", pos),
        ("device", pos),
        ("payload", pos),
        ("stop_event", pos),
    ]
    assert _params(core.BaseClientTrainer.uplink_package) == [("self", pos)]
    sh = core.BaseServerHandler
    for name in ("downlink_package", "sample_clients", "is_stopped", "if_stop"):
        assert _params(getattr(sh, name)) == [("self", pos)]
    assert _params(sh.global_update) == [("self", pos), ("buffer", pos)]
    assert _params(sh.load) == [("self", pos), ("payload", pos)]


def test_generic_parameters_can_be_subscripted_as_in_blazefl() -> None:
    core.BaseServerHandler[int, str]
    core.BaseClientTrainer[int, str]
    core.ProcessPoolClientTrainer[int, str, dict, int]
    core.ThreadPoolClientTrainer[int, str]
    core.ModelSelector[str]


class NewStyleServer(BaseServerHandler[int, int]):
    def __init__(self) -> None:
        self.round = 0

    def is_stopped(self) -> bool:
        return self.round >= 2


class OldStyleServer(BaseServerHandler[int, int]):
    def __init__(self) -> None:
        self.round = 0

    def if_stop(self) -> bool:
        return self.round >= 1


class IncompleteServer(BaseServerHandler[int, int]):
    pass


def test_if_stop_and_is_stopped_are_aliases_either_way() -> None:
    new = NewStyleServer()
    assert new.if_stop() is False and new.is_stopped() is False
    new.round = 2
    assert new.if_stop() is True
    old = OldStyleServer()
    assert old.is_stopped() is False
    old.round = 1
    assert old.is_stopped() is True and old.if_stop() is True


def test_missing_server_methods_raise_naming_the_class() -> None:
    server = IncompleteServer()
    with pytest.raises(NotImplementedError, match="IncompleteServer"):
        server.is_stopped()
    with pytest.raises(NotImplementedError, match="IncompleteServer"):
        server.downlink_package()
    with pytest.raises(NotImplementedError, match="global_update"):
        server.global_update([1])


class ModelName(str, Enum):  # Python 3.10 has no StrEnum; a str Enum is the same
    TINY = "tiny"


class Selector(ModelSelector[ModelName]):
    def select_model(self, model_name: ModelName) -> torch.nn.Module:
        if model_name == ModelName.TINY:
            return torch.nn.Linear(2, 2)
        raise ValueError(model_name)


def test_model_selector_subclass() -> None:
    assert isinstance(Selector().select_model(ModelName.TINY), torch.nn.Linear)


def test_default_uplink_package_empties_the_cache() -> None:
    class Trainer(core.BaseClientTrainer[int, int]):
        def __init__(self) -> None:
            self.cache: list[int] = [1, 2]

    trainer = Trainer()
    assert trainer.uplink_package() == [1, 2]
    assert trainer.uplink_package() == []
    with pytest.raises(NotImplementedError, match="local_process"):
        trainer.local_process(0, [1])
