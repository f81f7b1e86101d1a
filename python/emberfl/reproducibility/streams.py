"""Per-client random streams and a tensor encoding of generator states.

Every (seed, client id, round) triple names one random stream. The stream is the
same whatever process, thread or order the client runs in, so a simulation gives
identical results however its clients are scheduled over workers.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

from emberfl.reproducibility.generator import (
    RNGSuite,
    check_client_id,
    check_seed,
    create_rng_suite,
)

__all__ = [
    "client_rng_suite",
    "client_seed",
    "restore_rng_suite",
    "rng_suite_state",
    "seed_client",
]

_SEED_MASK = (1 << 63) - 1


def client_seed(seed: int, cid: int, round: int) -> int:
    """A 63-bit seed for client ``cid`` in ``round`` of a run seeded with ``seed``.

    Derived with ``numpy.random.SeedSequence([seed, cid, round])``. Each value must
    lie in ``[0, 2**32)``: SeedSequence splits larger integers into several 32-bit
    words, and with mixed word counts two different triples can produce the same
    entropy words. With one word each, distinct triples give distinct entropy and
    SeedSequence's hashing turns them into unrelated seeds. 63 bits keep the result
    a valid non-negative int64 (torch, safetensors).
    """
    check_seed(seed)
    check_client_id(cid, "cid")
    check_seed(round, "round")
    sequence = np.random.SeedSequence([int(seed), int(cid), int(round)])
    word = sequence.generate_state(1, dtype=np.uint64)[0]
    return int(word) & _SEED_MASK


def client_rng_suite(seed: int, cid: int, round: int) -> RNGSuite:
    """An :class:`RNGSuite` seeded with :func:`client_seed` of the triple."""
    return create_rng_suite(client_seed(seed, cid, round))


def seed_client(seed: int, cid: int, round: int) -> None:
    """Seed the process-global generators for one client's turn.

    Python's ``random``, NumPy's legacy global generator and torch's CPU and CUDA
    generators are all seeded from :func:`client_seed`, so code that uses the
    global generators (model initialisation, dropout, augmentations) sees the
    client's own stream. ``PYTHONHASHSEED`` is left alone: it only affects processes
    started later.
    """
    s = client_seed(seed, cid, round)
    random.seed(s)
    # The legacy generator takes at most 32 bits as an int; as a word array it
    # takes the whole 63-bit seed, so clients do not collide on the low 32 bits.
    np.random.seed(np.array([s & 0xFFFFFFFF, s >> 32], dtype=np.uint32))
    # The default generator directly: torch.manual_seed() goes through several
    # dispatch layers (about 2.5 ms a call here), paid once per client.
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)


# --- generator states as tensors ---------------------------------------------------

_NDARRAY_TAG = "__ndarray__"


def _json_default(value: object) -> object:
    if isinstance(value, np.ndarray):
        return {
            _NDARRAY_TAG: value.dtype.str,
            "shape": list(value.shape),
            "data": value.ravel().tolist(),
        }
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"cannot encode {type(value).__name__} in a numpy generator state")


def _json_object_hook(obj: dict[str, Any]) -> object:
    if _NDARRAY_TAG in obj:
        array = np.array(obj["data"], dtype=np.dtype(obj[_NDARRAY_TAG]))
        return array.reshape(obj["shape"])
    return obj


def _text_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def _tensor_text(tensor: torch.Tensor, key: str) -> str:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"RNG state entry {key!r} must be a 1-D uint8 tensor")
    return bytes(tensor.cpu().numpy().tobytes()).decode("utf-8")


def rng_suite_state(suite: RNGSuite, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state of every generator in ``suite`` as CPU tensors.

    The result can be written with :func:`emberfl.store.save` (several suites fit in
    one file with distinct ``prefix`` values) and turned back into generators that
    continue the same streams with :func:`restore_rng_suite`.

    Keys (after ``prefix``): ``python.state`` (int64, Mersenne Twister words and
    position), ``python.version`` (int64), ``python.gauss_next`` (float64, empty when
    no cached value), ``numpy.state`` (uint8, JSON of the bit generator's state),
    ``torch_cpu.state`` (uint8), and with a CUDA generator ``torch_cuda.state``
    (uint8) and ``torch_cuda.device`` (int64).
    """
    if not isinstance(suite, RNGSuite):
        raise TypeError(f"expected an RNGSuite, got {type(suite).__name__}")
    version, internal, gauss_next = suite.python.getstate()
    state: dict[str, torch.Tensor] = {
        f"{prefix}python.state": torch.tensor(internal, dtype=torch.int64),
        f"{prefix}python.version": torch.tensor([version], dtype=torch.int64),
        f"{prefix}python.gauss_next": torch.tensor(
            [] if gauss_next is None else [gauss_next], dtype=torch.float64
        ),
        f"{prefix}numpy.state": _text_tensor(
            json.dumps(suite.numpy.bit_generator.state, default=_json_default, sort_keys=True)
        ),
        f"{prefix}torch_cpu.state": suite.torch_cpu.get_state().clone(),
    }
    if suite.torch_cuda is not None:
        device = suite.torch_cuda.device
        state[f"{prefix}torch_cuda.state"] = suite.torch_cuda.get_state().cpu().clone()
        state[f"{prefix}torch_cuda.device"] = torch.tensor(
            [device.index if device.index is not None else torch.cuda.current_device()],
            dtype=torch.int64,
        )
    return state


def _entry(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        value = state[key]
    except KeyError:
        raise KeyError(f"RNG state has no entry {key!r}") from None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"RNG state entry {key!r} must be a tensor, got {type(value).__name__}")
    return value


def _own_bytes(tensor: torch.Tensor) -> torch.Tensor:
    # Generator.set_state reads from the start of the tensor's storage, ignoring a
    # view's offset, and tensors loaded from a store file are views into one mapping:
    # hand it a copy that owns its storage.
    return tensor.detach().cpu().clone(memory_format=torch.contiguous_format)


def restore_rng_suite(state: dict[str, torch.Tensor], prefix: str = "") -> RNGSuite:
    """Rebuild the :class:`RNGSuite` captured by :func:`rng_suite_state`.

    The new generators continue exactly where the captured ones stood. A state that
    includes a CUDA generator needs CUDA to be available.
    """
    python_words = _entry(state, f"{prefix}python.state")
    version = _entry(state, f"{prefix}python.version")
    gauss = _entry(state, f"{prefix}python.gauss_next")
    if python_words.dim() != 1 or version.numel() != 1 or gauss.numel() > 1:
        raise ValueError(f"RNG state entries under prefix {prefix!r} have unexpected shapes")
    python_rng = random.Random()
    try:
        python_rng.setstate(
            (
                int(version.item()),
                tuple(int(v) for v in python_words.tolist()),
                float(gauss.item()) if gauss.numel() == 1 else None,
            )
        )
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"invalid python RNG state under prefix {prefix!r}: {exc}") from exc

    numpy_text = _tensor_text(_entry(state, f"{prefix}numpy.state"), f"{prefix}numpy.state")
    try:
        numpy_state = json.loads(numpy_text, object_hook=_json_object_hook)
        name = numpy_state["bit_generator"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"invalid numpy RNG state under prefix {prefix!r}: {exc}") from exc
    bit_generator_cls = getattr(np.random, str(name), None)
    if not (
        isinstance(bit_generator_cls, type)
        and issubclass(bit_generator_cls, np.random.BitGenerator)
    ):
        raise ValueError(f"unknown numpy bit generator {name!r} under prefix {prefix!r}")
    bit_generator = bit_generator_cls()
    try:
        bit_generator.state = numpy_state
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"invalid numpy RNG state under prefix {prefix!r}: {exc}") from exc

    torch_cpu = torch.Generator(device="cpu")
    torch_cpu.set_state(_own_bytes(_entry(state, f"{prefix}torch_cpu.state")))

    torch_cuda = None
    cuda_key = f"{prefix}torch_cuda.state"
    if cuda_key in state:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"RNG state {cuda_key!r} holds a CUDA generator but CUDA is not available"
            )
        index = int(_entry(state, f"{prefix}torch_cuda.device").item())
        torch_cuda = torch.Generator(device=f"cuda:{index}")
        torch_cuda.set_state(_own_bytes(_entry(state, cuda_key)))

    return RNGSuite(
        python=python_rng,
        numpy=np.random.Generator(bit_generator),
        torch_cpu=torch_cpu,
        torch_cuda=torch_cuda,
    )
