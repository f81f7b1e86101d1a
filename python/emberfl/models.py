"""The model zoo used by the command line and the examples.

All models take a float batch shaped ``(N, *in_shape)`` (already normalised) and return
raw logits ``(N, num_classes)``; the softmax lives in the cross-entropy loss.

==============  ==========================================================================
name            model
==============  ==========================================================================
``mlp``         small default: flatten -> 128 -> ReLU -> classes (the digits default)
``logreg``      multinomial logistic regression (FedProx's model for Synthetic(a, b))
``2nn``         McMahan et al. 2017 "2NN": flatten -> 200 -> ReLU -> 200 -> ReLU -> classes
                (199,210 parameters for 784 inputs)
``cnn``         McMahan et al. 2017 MNIST CNN: 5x5 conv 32 -> 2x2 max-pool -> 5x5 conv 64
                -> 2x2 max-pool -> fc 512 -> classes; "same" padding (1,663,370 parameters
                for 1x28x28)
``cifar_cnn``   the PyTorch tutorial CIFAR-10 CNN: 5x5 conv 6 -> pool -> 5x5 conv 16 ->
                pool -> 120 -> 84 -> classes, no padding (62,006 parameters for 3x32x32)
``resnet18``    ResNet-18, CIFAR variant: 3x3 stride-1 stem without max-pool, four stages of
                two basic blocks (64/128/256/512 channels), batch norm, global average
                pool (11,173,962 parameters for 3x32x32 and 10 classes)
==============  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "CifarCnn",
    "Cnn",
    "Mlp",
    "ResNet18",
    "ZooModelSelector",
    "count_parameters",
    "create_model",
]


class Mlp(nn.Module):
    """Fully connected ReLU network over the flattened input."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class Cnn(nn.Module):
    """McMahan et al. 2017's CNN for MNIST (two 5x5 conv layers, fc 512)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = in_shape
        if height < 4 or width < 4:
            raise ValueError(f"cnn needs images of at least 4x4 pixels, got {height}x{width}")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        # "Same" padding keeps the size through each conv; each pool halves it (floor).
        flat = 64 * (height // 2 // 2) * (width // 2 // 2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out


class CifarCnn(nn.Module):
    """The CNN from the PyTorch "Training a classifier" tutorial."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = in_shape
        # Two unpadded 5x5 convs, each followed by a 2x2 pool.
        out_h = ((height - 4) // 2 - 4) // 2
        out_w = ((width - 4) // 2 - 4) // 2
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"cifar_cnn needs images of at least 16x16 pixels, got {height}x{width}"
            )
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * out_h * out_w, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (He et al. 2016, CIFAR stem: 3x3 conv, no max-pool)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    _BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1)
                )
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.pool(out), 1)
        result: torch.Tensor = self.fc(out)
        return result


def _image_shape(name: str, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(in_shape) == 2:
        # A bare (H, W) image is read as one channel.
        return (1, in_shape[0], in_shape[1])
    if len(in_shape) != 3:
        raise ValueError(
            f"model {name!r} needs image input shaped (channels, height, width), got {in_shape}"
        )
    return (in_shape[0], in_shape[1], in_shape[2])


def _mlp(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return Mlp(math.prod(in_shape), (128,), num_classes)


def _logreg(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return Mlp(math.prod(in_shape), (), num_classes)


def _two_nn(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return Mlp(math.prod(in_shape), (200, 200), num_classes)


def _cnn(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return Cnn(_image_shape("cnn", in_shape), num_classes)


def _cifar_cnn(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CifarCnn(_image_shape("cifar_cnn", in_shape), num_classes)


def _resnet18(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    channels, height, width = _image_shape("resnet18", in_shape)
    if height < 8 or width < 8:
        raise ValueError(f"resnet18 needs images of at least 8x8 pixels, got {height}x{width}")
    return ResNet18(channels, num_classes)


_FACTORIES: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp,
    "logreg": _logreg,
    "2nn": _two_nn,
    "cnn": _cnn,
    "cifar_cnn": _cifar_cnn,
    "resnet18": _resnet18,
}

MODEL_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def create_model(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Build model ``name`` for inputs shaped ``in_shape`` (without the batch axis).

    With ``seed`` the weights are initialised from that seed without disturbing torch's
    global random state, so two calls with the same seed give identical models.
    """
    key = name.strip().lower().replace("-", "_")
    factory = _FACTORIES.get(key)
    if factory is None:
        raise ValueError(f"unknown model {name!r}; valid names are: {', '.join(MODEL_NAMES)}")
    shape = tuple(int(d) for d in in_shape)
    if len(shape) == 0 or any(d < 1 for d in shape):
        raise ValueError(f"in_shape must be non-empty with positive sizes, got {tuple(in_shape)}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
    if seed is None:
        return factory(shape, int(num_classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(shape, int(num_classes))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class ZooModelSelector:
    """A :class:`~emberfl.core.ModelSelector` over :func:`create_model`.

    Every model it builds for a name starts from the same weights (drawn from
    ``seed``). Frozen and small: it pickles into every task, and worker processes
    reuse the model they built for an equal selector.
    """

    in_shape: tuple[int, ...]
    num_classes: int
    seed: int = 0

    def select_model(self, model_name: str) -> nn.Module:
        return create_model(model_name, self.in_shape, self.num_classes, seed=self.seed)
