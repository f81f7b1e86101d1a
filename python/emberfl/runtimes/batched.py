"""The batched runtime: K clients of a round trained as one batched model (torch.func).

For the small models of FL research one client's SGD step is too small to fill a
core's vector units, let alone a GPU: per-op overhead dominates. Here the K clients
of a group share every op: their weights are stacked (``torch.func.stack_module_state``)
and one ``vmap(grad(...))`` of ``functional_call`` computes all K gradients at once.

Each client sees exactly the batches it sees in the per-client runtimes: its loader
comes from its own ``(seed, cid, round)`` generator, epoch after epoch. Clients with
less data are padded: at step ``s`` a client's batch is padded to the group's batch
size with masked samples, so its loss is the mean over its real samples (a partial
last batch gives the unpadded gradient), and a client with no step ``s`` left does
not move (its gradients are zero, and whatever the client step adds to them is masked)
nor count the step. Results agree with the per-client path within float tolerance, not
bitwise: the batched GEMMs sum in another order.

Supported: the client steps whose :meth:`FedAvgClientUpdate.batched_step` gives a
:class:`~emberfl.core.step.BatchedClientStep` -- FedAvg's, FedProx's
(``mu * (w - w_global)`` added to each gradient) and SCAFFOLD's (``c - c_i`` added,
with ``c_i`` stacked per client), so FedAvg, FedProx, SCAFFOLD and the FedOpt
servers. Models whose training writes
buffers (BatchNorm's running statistics), draws random numbers (dropout) or branches
on data cannot be batched: the trainer tries one batched step when it is built and
raises ``ValueError`` naming the reason before any round runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from emberfl.core.checks import check_positive_int
from emberfl.core.client_trainer import BaseClientTrainer, deliver_uplink
from emberfl.core.fold import InProcessFold, read_fold
from emberfl.core.model_packages import (
    FedAvgDownlinkPackage,
    FedAvgPartitionedDataset,
    FedAvgUplinkPackage,
)
from emberfl.core.model_selector import ModelSelector
from emberfl.core.step import BatchedClientStep, BatchedGroup, FedAvgClientUpdate
from emberfl.core.utils import deserialize_model, serialize_model
from emberfl.reproducibility import RandomStateSnapshot
from emberfl.runtimes.client_round import as_payload, client_loader, client_round
from emberfl.runtimes.settings import FedAvgTrainerSettings, SettingsAttributes

__all__ = ["FedAvgBatchedClientTrainer", "check_batchable"]

#: Clients trained together when ``batch_clients`` is not given.
DEFAULT_BATCH_CLIENTS = 32

Batch = tuple[torch.Tensor, torch.Tensor]


def _batched_step(update: FedAvgClientUpdate) -> BatchedClientStep:
    """The batched form of a client step, or ``ValueError`` when it has none."""
    step = update.batched_step()
    if step is None:
        raise ValueError(
            "the batched runtime trains FedAvg's, FedProx's and SCAFFOLD's client steps "
            f"only (and others with a batched form), not {type(update).__name__} (its "
            "hooks run per client): use the process, thread or serial runtime"
        )
    return step


def check_batchable(model: nn.Module, sample: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ``ValueError`` naming why ``model`` cannot be trained batched, if it cannot.

    BatchNorm in training mode is refused by name (it would update running statistics
    per client); anything else that vmap cannot batch (in-place buffer writes, random
    ops, data-dependent control flow) is found by one batched step of two copies on
    ``sample`` / ``target`` (one sample's input and label).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            raise ValueError(
                f"module {name or type(model).__name__!r} ({type(module).__name__}) updates "
                "running statistics in training mode, which clients trained batched cannot "
                "keep apart: use the process, thread or serial runtime, or a norm layer "
                "without running statistics (GroupNorm, LayerNorm)"
            )
    step = _GroupStep(model)
    params, _ = stack_module_state([model, model])
    params = {k: v.detach() for k, v in params.items() if k in step.names}
    x = sample.unsqueeze(0).unsqueeze(0).expand(2, 1, *sample.shape)
    y = target.reshape(1, 1).expand(2, 1)
    mask = torch.ones(2, 1)
    try:
        step.grads(params, x, y, mask)
    except Exception as exc:  # vmap's refusals are RuntimeErrors of several kinds
        raise ValueError(
            f"model {type(model).__name__} cannot be trained batched ({type(exc).__name__}: "
            f"{exc}); use the process, thread or serial runtime"
        ) from exc


class _GroupStep:
    """Per-client masked mean cross-entropy and its gradient, vmapped over clients."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.buffers = dict(model.named_buffers())

        def loss(
            params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
        ) -> torch.Tensor:
            out = functional_call(self.model, (params, self.buffers), (x,))
            ce = nn.functional.cross_entropy(out, y, reduction="none")
            return (ce * m).sum() / m.sum().clamp(min=1.0)

        self._grads = vmap(grad_and_value(loss), in_dims=(0, 0, 0, 0), randomness="error")

    def grads(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out: tuple[dict[str, torch.Tensor], torch.Tensor] = self._grads(params, x, y, m)
        return out


class FedAvgBatchedClientTrainer(
    SettingsAttributes, BaseClientTrainer[FedAvgUplinkPackage, FedAvgDownlinkPackage]
):
    """Trains a round's clients ``batch_clients`` at a time as one batched model.

    BlazeFL's serial-trainer arguments, plus the keywords ``batch_clients`` (clients
    per group, default 32; memory grows with it), ``client_update`` (FedAvg's,
    FedProx's or SCAFFOLD's step), ``state_dir`` and ``progress``. Uplinks reach ``cache`` (or the
    trainer's ``uplink_fold``) in the order of ``cid_list``.
    """

    def __init__(
        self,
        model_selector: ModelSelector[Any],
        model_name: str,
        dataset: FedAvgPartitionedDataset,
        device: str,
        num_clients: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        *,
        batch_clients: int | None = None,
        state_dir: Path | str | None = None,
        client_update: FedAvgClientUpdate | None = None,
        progress: bool = True,
    ) -> None:
        self.settings = FedAvgTrainerSettings(
            model_selector,
            model_name,
            dataset,
            device,
            num_clients,
            epochs,
            batch_size,
            lr,
            seed,
            state_dir=None if state_dir is None else Path(state_dir),
            client_update=FedAvgClientUpdate() if client_update is None else client_update,
            progress=progress,
        )
        self.batch_clients = check_positive_int(
            DEFAULT_BATCH_CLIENTS if batch_clients is None else batch_clients, "batch_clients"
        )
        _batched_step(self.settings.client_update)  # refused now, not in the first round
        self.settings.client_state()  # creates state_dir now, as the other trainers do
        self.model = model_selector.select_model(model_name).to(self.device)
        self.cache: list[FedAvgUplinkPackage] = []
        self.round = 0
        self._step = _GroupStep(self.model)
        probe = _first_sample(dataset, num_clients)
        if probe is not None:
            check_batchable(self.model, *probe)

    def uplink_package(self) -> list[FedAvgUplinkPackage]:
        """The uplinks produced since the last call."""
        package, self.cache = self.cache, []
        return package

    def local_process(
        self, payload: FedAvgDownlinkPackage | torch.Tensor, cid_list: list[int]
    ) -> None:
        """Train every client of ``cid_list`` from ``payload``, in groups; uplinks go to
        ``cache`` in client-list order."""
        payload = as_payload(payload)
        hooks = _batched_step(self.settings.client_update)
        round_index = self.round
        self.round += 1
        fold = read_fold(self)
        folding = None if fold is None else InProcessFold(fold, len(cid_list))
        results: list[FedAvgUplinkPackage] = []
        snapshot = RandomStateSnapshot.capture()
        try:
            for start in range(0, len(cid_list), self.batch_clients):
                group = cid_list[start : start + self.batch_clients]
                uplinks = self._train_group(payload, group, round_index, hooks)
                for offset, uplink in enumerate(uplinks):
                    index = start + offset
                    if folding is not None:
                        uplink = folding.add(index, uplink)
                    results.append(deliver_uplink(self, index, uplink))
        finally:
            RandomStateSnapshot.restore(snapshot)
        if folding is not None:
            folding.finish()
        self.cache.extend(results)

    # -- one group -------------------------------------------------------------------

    def _client_batches(self, cid: int, round_index: int) -> tuple[list[Batch], int]:
        """Client ``cid``'s batches over all its epochs, in the per-client order, and
        its number of samples."""
        s = self.settings
        with client_round(s, cid, round_index) as loader:
            batches = [(x, y) for _ in range(s.epochs) for x, y in loader]
        data = loader.dataset
        size = len(data) if isinstance(data, Sized) else sum(len(y) for _, y in batches)
        return batches, size

    def _train_group(
        self,
        payload: FedAvgDownlinkPackage,
        group: list[int],
        round_index: int,
        hooks: BatchedClientStep,
    ) -> list[FedAvgUplinkPackage]:
        s = self.settings
        started = time.perf_counter()
        dev = torch.device(s.device)
        deserialize_model(self.model, payload.model_parameters)
        per_client = [self._client_batches(cid, round_index) for cid in group]
        k = len(group)
        steps = [len(batches) for batches, _ in per_client]
        width = max((len(y) for batches, _ in per_client for _, y in batches), default=1)
        step = self._step
        params, _ = stack_module_state([self.model] * k)
        params = {n: params[n].detach().to(dev) for n in step.names}
        run = BatchedGroup(
            cids=list(group),
            model=self.model,
            payload=payload,
            params=params,
            device=dev,
            lr=s.lr,
            state=s.client_state(),
            extra={},
        )
        hooks.begin(run)
        loss_sum = torch.zeros(k, dtype=torch.float64, device=dev)
        samples = torch.zeros(k, dtype=torch.float64, device=dev)
        xs, ys, ms = _padded(per_client, width, max(steps, default=0))
        xs, ys, ms = xs.to(dev), ys.to(dev), ms.to(dev)
        counts = ms.sum(dim=2)  # samples of each client's step t: [k, steps]
        active = (counts > 0).to(torch.float32)  # which clients take step t: [k, steps]
        for t in range(max(steps, default=0)):
            grads, losses = step.grads(params, xs[:, t], ys[:, t], ms[:, t])
            count = counts[:, t]
            loss_sum += losses.detach().to(torch.float64) * count
            samples += count
            # A client without a step t has a zero loss, hence exactly zero gradients:
            # p - lr * 0 is p. What the client step adds to them is masked by `active`.
            with torch.no_grad():
                hooks.correct_(run, grads, active[:, t])
                for name, p in params.items():
                    p.sub_(grads[name], alpha=s.lr)
        seconds = (time.perf_counter() - started) / max(k, 1)
        uplinks = []
        named = dict(self.model.named_parameters())
        for i, cid in enumerate(group):
            with torch.no_grad():
                for name, p in params.items():
                    named[name].copy_(p[i])
            seen = float(samples[i])
            package = FedAvgUplinkPackage(
                cid=cid,
                model_parameters=serialize_model(self.model),
                data_size=per_client[i][1],
                metadata={
                    "loss": float(loss_sum[i]) / seen if seen else math.nan,
                    "steps": float(steps[i]),
                    "train_seconds": seconds,
                },
            )
            uplinks.append(hooks.finish(run, i, package, steps[i]))
        return uplinks


def _padded(
    per_client: list[tuple[list[Batch], int]], width: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every client's batches, padded: inputs ``[k, steps, width, ...]``, labels and a
    sample mask ``[k, steps, width]`` (1 for a real sample, 0 for padding)."""
    k = len(per_client)
    shape: tuple[int, ...] = ()
    dtype = torch.float32
    for batches, _ in per_client:
        if batches:
            shape = tuple(batches[0][0].shape[1:])
            dtype = batches[0][0].dtype
            break
    xs = torch.zeros((k, steps, width, *shape), dtype=dtype)
    ys = torch.zeros((k, steps, width), dtype=torch.long)
    ms = torch.zeros((k, steps, width), dtype=torch.float32)
    for i, (batches, _) in enumerate(per_client):
        for t, (x, y) in enumerate(batches):
            n = len(y)
            xs[i, t, :n] = x
            ys[i, t, :n] = y
            ms[i, t, :n] = 1.0
    return xs, ys, ms


def _first_sample(
    dataset: FedAvgPartitionedDataset | None, num_clients: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One training sample and its label, from the first client that has any."""
    if dataset is None:
        return None
    for cid in range(num_clients):
        for x, y in client_loader(dataset, cid, 1, torch.Generator().manual_seed(0)):
            return x[0], y[0]
    return None
