"""The local training loop every algorithm shares, and loader-based evaluation.

:func:`local_sgd` runs epochs of minibatch SGD on cross-entropy. Algorithms change
it through one hook, ``after_backward``, called between ``backward()`` and the
optimizer step: FedProx adds the proximal gradient there, SCAFFOLD its control
variate correction. Everything random (the batch order) comes from the loader's
generator, so a client's training is reproducible wherever it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from emberfl.core.checks import check_nonnegative_int, check_positive_number

__all__ = ["LocalTrainingResult", "StopSignal", "evaluate_loader", "local_sgd", "sgd_step"]


class StopSignal(Protocol):
    """Anything with ``is_set()``: a threading, multiprocessing or shared-file event."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class LocalTrainingResult:
    """What a client's local training did.

    ``steps`` counts optimizer steps, ``samples`` the samples seen over all epochs,
    ``loss`` is their mean cross-entropy (NaN when no step was taken).
    """

    steps: int
    samples: int
    loss: float


def local_sgd(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device,
    epochs: int,
    lr: float,
    stop_event: StopSignal | None = None,
    *,
    after_backward: Callable[[], None] | None = None,
) -> LocalTrainingResult:
    """Train ``model`` (already on ``device``) for ``epochs`` passes over ``loader``.

    Plain SGD (no momentum, no weight decay) with learning rate ``lr`` on the mean
    cross-entropy of each batch.
    ``after_backward`` may change the gradients before each step. Training stops
    early, between epochs, once ``stop_event`` is set.
    """
    check_nonnegative_int(epochs, "epochs")
    check_positive_number(lr, "lr")
    dev = torch.device(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    criterion = nn.CrossEntropyLoss()
    # Summed as a tensor so that a GPU run does not synchronise on every step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    steps = 0
    samples = 0
    for _ in range(epochs):
        if stop_event is not None and stop_event.is_set():
            break
        for data, target in loader:
            data = data.to(dev, non_blocking=True)
            target = target.to(dev, non_blocking=True)
            output = model(data)
            loss = criterion(output, target)
            for p in params:
                p.grad = None
            loss.backward()
            if after_backward is not None:
                after_backward()
            sgd_step(params, lr)
            n = int(target.shape[0])
            loss_sum += loss.detach().to(torch.float64) * n
            steps += 1
            samples += n
    mean = float(loss_sum) / samples if samples else math.nan
    return LocalTrainingResult(steps=steps, samples=samples, loss=mean)


def sgd_step(params: Sequence[torch.Tensor], lr: float) -> None:
    """``p -= lr * p.grad`` for every parameter with a gradient: ``torch.optim.SGD``
    without momentum or weight decay, bit for bit.

    Written out because constructing a ``torch.optim`` optimizer imports torch's
    compiler stack on first use, which costs seconds in every fresh worker process.
    """
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)


def evaluate_loader(
    model: nn.Module, loader: Iterable[Any], device: str | torch.device
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (BlazeFL's order).

    The model is moved to ``device`` and evaluated in eval mode; its train/eval mode
    is restored afterwards. Raises ``ValueError`` when the loader yields no sample.
    """
    dev = torch.device(device)
    was_training = model.training
    model.to(dev)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    total = 0
    try:
        with torch.inference_mode():
            for data, target in loader:
                data = data.to(dev, non_blocking=True)
                target = target.to(dev, non_blocking=True)
                output = model(data)
                loss_sum += nn.functional.cross_entropy(output.float(), target, reduction="sum").to(
                    torch.float64
                )
                correct += (output.argmax(dim=1) == target).sum()
                total += int(target.shape[0])
    finally:
        model.train(was_training)
    if total == 0:
        size = len(loader) if isinstance(loader, Sized) else "?"
        raise ValueError(
            f"the evaluation loader must yield at least one sample, got none ({size} batches)"
        )
    return float(loss_sum) / total, int(correct) / total
