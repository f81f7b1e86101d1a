"""Model zoo: architectures, parameter counts, shapes, seeding and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emberfl.models import MODEL_NAMES, count_parameters, create_model


def linear(i: int, o: int) -> int:
    return i * o + o


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def test_names() -> None:
    assert {"2nn", "cnn", "cifar_cnn", "resnet18", "mlp"} <= set(MODEL_NAMES)
    with pytest.raises(ValueError) as info:
        create_model("vgg", (1, 28, 28), 10)
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_two_nn_is_mcmahan_2nn() -> None:
    model = create_model("2nn", (1, 28, 28), 10)
    expected = linear(784, 200) + linear(200, 200) + linear(200, 10)
    assert count_parameters(model) == expected
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [200, 200, 10]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2
    digits = create_model("2nn", (1, 8, 8), 10)
    first = next(m for m in digits.modules() if isinstance(m, nn.Linear))
    assert first.in_features == 64


def test_cnn_is_mcmahan_cnn() -> None:
    model = create_model("cnn", (1, 28, 28), 10)
    expected = conv(1, 32, 5) + conv(32, 64, 5) + linear(7 * 7 * 64, 512) + linear(512, 10)
    assert count_parameters(model) == expected
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    # The flatten size is computed, so other image sizes work too.
    for shape in [(1, 8, 8), (3, 32, 32), (1, 13, 17)]:
        out = create_model("cnn", shape, 7)(torch.zeros(2, *shape))
        assert out.shape == (2, 7)


def test_cifar_cnn_is_tutorial_net() -> None:
    model = create_model("cifar_cnn", (3, 32, 32), 10)
    expected = (
        conv(3, 6, 5) + conv(6, 16, 5) + linear(16 * 5 * 5, 120) + linear(120, 84) + linear(84, 10)
    )
    assert count_parameters(model) == expected
    assert create_model("cifar_cnn", (1, 28, 28), 10)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(ValueError, match="16x16"):
        create_model("cifar_cnn", (1, 8, 8), 10)


def test_resnet18() -> None:
    model = create_model("resnet18", (3, 32, 32), 10)
    n = count_parameters(model)
    assert round(n / 1e6, 1) == 11.2
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 1 stem + 8 blocks x 2 convs + 3 projection shortcuts; the stem is 3x3, stride 1.
    assert len(convs) == 1 + 16 + 3
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    gray = create_model("resnet18", (1, 28, 28), 5)
    assert next(gray.parameters()).shape[1] == 1


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", (1, 8, 8)), ("logreg", (60,)), ("2nn", (1, 28, 28)), ("cnn", (1, 28, 28))],
)
def test_forward_backward(name: str, shape: tuple[int, ...]) -> None:
    model = create_model(name, shape, 10, seed=0)
    x = torch.randn(4, *shape)
    logits = model(x)
    assert logits.shape == (4, 10) and logits.dtype == torch.float32
    loss = nn.functional.cross_entropy(logits, torch.arange(4))
    loss.backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_seeded_construction() -> None:
    before = torch.random.get_rng_state()
    a = create_model("cnn", (1, 28, 28), 10, seed=7)
    b = create_model("cnn", (1, 28, 28), 10, seed=7)
    c = create_model("cnn", (1, 28, 28), 10, seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert not all(
        torch.equal(va, vc)
        for va, vc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )


def test_bad_shapes_and_classes() -> None:
    with pytest.raises(ValueError, match="channels, height, width"):
        create_model("cnn", (60,), 10)
    with pytest.raises(ValueError, match="4x4"):
        create_model("cnn", (1, 3, 3), 10)
    with pytest.raises(ValueError, match="in_shape"):
        create_model("mlp", (0, 8), 10)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mlp", (64,), 1)
    # Names are matched without case, surrounding space or the dash/underscore difference.
    spelled = create_model(" CIFAR-CNN ", (3, 32, 32), 10, seed=3)
    canonical = create_model("cifar_cnn", (3, 32, 32), 10, seed=3)
    assert type(spelled) is type(canonical)
    for (ka, va), (kb, vb) in zip(
        spelled.state_dict().items(), canonical.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
