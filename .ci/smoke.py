"""Smoke check of an installed emberfl wheel: `python smoke.py [--full]`.

Without torch (numpy alone): the compiled core imports on this CPython, a store file makes
a round trip, the float32 weighted mean and the exact sum give the expected values.
``--full`` (an environment with torch) adds a 2-round `emberfl run` on the digits data.
Run it from outside the source tree so that the installed package is the one imported.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import emberfl
from emberfl import _core


def main() -> None:
    print(f"emberfl {emberfl.__version__} from {emberfl.__file__} on Python {sys.version.split()[0]}")
    assert "site-packages" in emberfl.__file__, "the installed wheel must be the one imported"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.safetensors"
        x = np.arange(12, dtype=np.float32)
        _core.save_file(path, ["x"], ["F32"], [[3, 4]], [x.view(np.uint8)], [("k", "v")])
        mapped = _core.MappedFile(path)
        (back,) = mapped.arrays()
        assert mapped.metadata == {"k": "v"}
        assert np.array_equal(back.reshape(-1), x), "store round trip"
    a, b = np.full(5, 1.0, np.float32), np.full(5, 4.0, np.float32)
    out = np.empty(5, np.float32)
    _core.weighted_sum([a, b], "f32", [1.0, 2.0], out)
    assert np.allclose(out, 3.0), f"weighted mean: {out}"
    exact = _core.ExactSum(5)
    exact.add(a, "f32", 1.0)
    exact.add(b, "f32", 2.0)
    assert np.array_equal(exact.finish(), np.full(5, 3.0, np.float32)), "exact mean"
    print("core: store round trip, weighted mean, exact sum: ok")
    if "--full" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run(
                ["emberfl", "run", "--rounds", "2", "--no-progress", "--out", str(Path(tmp) / "r")],
                capture_output=True,
                text=True,
                check=False,
            )
            print(run.stdout.strip().splitlines()[-1] if run.stdout.strip() else "")
            assert run.returncode == 0, run.stderr
            assert (Path(tmp) / "r" / "model.safetensors").is_file()
        print("emberfl run, 2 rounds on digits: ok")


if __name__ == "__main__":
    main()
