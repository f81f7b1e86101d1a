"""Corrupt, truncated and hostile files raise StoreError -- never a crash.

Every case is loaded *and every byte of every tensor is read*: a file that passed
validation but lied about its size would crash the interpreter with SIGBUS here.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from emberfl import store


def valid_file(tmp_path: Path) -> bytes:
    path = tmp_path / "valid.safetensors"
    store.save(
        path,
        {
            "w": torch.randn(7, 3),
            "b": torch.randn(3).half(),
            "steps": torch.tensor(11),
            "mask": torch.tensor([True, False, True]),
        },
        metadata={"round": "1"},
    )
    return path.read_bytes()


def make(
    header: dict[str, object] | str | bytes, data: bytes = b"", declared: int | None = None
) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    n = len(raw) if declared is None else declared
    return struct.pack("<Q", n) + raw + data


def read_everything(path: Path) -> None:
    for t in store.load(path).values():
        if t.numel():
            t.reshape(-1).view(torch.uint8).sum()


def expect_error(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(store.StoreError) as info:
        read_everything(path)
    message = str(info.value)
    assert str(path) in message, message
    assert needle in message, message


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


CASES: list[tuple[str, bytes, str]] = [
    ("empty file", b"", "empty file"),
    ("short prefix", b"\x05\x00\x00", "shorter than"),
    ("huge header length", make("{}", declared=2**62), "exceeds the limit"),
    ("header past end", make("{}", declared=4096), "past the end"),
    ("garbage json", make("{not json!"), "not valid JSON"),
    ("json array", make("[1, 2, 3]"), "not a JSON object"),
    ("bad utf-8", make(b'{"\xff\xfe": 1}'), "UTF-8"),
    ("unknown dtype", make({"x": entry("F7", [1], 0, 4)}, b"\0" * 4), "unsupported dtype"),
    ("negative dim", make({"x": entry("F32", [-1], 0, 4)}, b"\0" * 4), "non-negative"),
    (
        "shape overflow",
        make({"x": entry("F32", [2**40, 2**40], 0, 4)}, b"\0" * 4),
        "overflows",
    ),
    ("wrong length", make({"x": entry("F32", [2], 0, 4)}, b"\0" * 4), "needs 8"),
    (
        "overlap",
        make({"x": entry("F32", [2], 0, 8), "y": entry("F32", [1], 4, 8)}, b"\0" * 8),
        "overlap",
    ),
    (
        "hole",
        make({"x": entry("F32", [1], 0, 4), "y": entry("F32", [1], 8, 12)}, b"\0" * 12),
        "hole",
    ),
    ("out of range", make({"x": entry("F32", [4], 0, 16)}, b"\0" * 8), "truncated"),
    ("trailing bytes", make({"x": entry("F32", [1], 0, 4)}, b"\0" * 9), "trailing"),
    ("reversed offsets", make({"x": entry("F32", [0], 8, 4)}), "end before"),
    ("metadata not strings", make({"__metadata__": {"a": 1}}), "must be a string"),
    ("extra field", make({"x": {**entry("U8", [1], 0, 1), "z": 0}}, b"\0"), "unexpected field"),
]


@pytest.mark.parametrize(("name", "content", "needle"), CASES, ids=[c[0] for c in CASES])
def test_corpus(tmp_path: Path, name: str, content: bytes, needle: str) -> None:
    expect_error(tmp_path, content, needle)


def test_every_truncation_of_a_valid_file(tmp_path: Path) -> None:
    full = valid_file(tmp_path)
    cut = tmp_path / "cut.safetensors"
    offsets = sorted({*range(0, 64), *range(64, len(full), 37), len(full) - 1})
    for n in offsets:
        cut.write_bytes(full[:n])
        with pytest.raises(store.StoreError):
            read_everything(cut)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(store.StoreError, match="cannot open"):
        store.load(tmp_path / "absent.safetensors")
    with pytest.raises(store.StoreError):
        store.load(tmp_path)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=hs.data())
def test_random_mutations_never_crash(tmp_path: Path, data: hs.DataObject) -> None:
    """Flip, insert or delete bytes anywhere: only StoreError (or a valid load) may result."""
    original = valid_file(tmp_path)
    buf = bytearray(original)
    for _ in range(data.draw(hs.integers(1, 4))):
        # Most interesting structure sits in the prefix and the JSON header.
        limit = data.draw(hs.sampled_from([16, 400, len(buf)]))
        pos = data.draw(hs.integers(0, max(0, min(limit, len(buf)) - 1)))
        op = data.draw(hs.sampled_from(["flip", "insert", "delete", "digit"]))
        if op == "flip" and buf:
            buf[pos] ^= 1 << data.draw(hs.integers(0, 7))
        elif op == "insert":
            buf.insert(pos, data.draw(hs.integers(0, 255)))
        elif op == "delete" and buf:
            del buf[pos]
        elif op == "digit" and buf:
            buf[pos] = ord(data.draw(hs.sampled_from("0123456789")))
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(buf))
    with contextlib.suppress(store.StoreError):
        read_everything(path)
