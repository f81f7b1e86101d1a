"""The ``emberfl`` command line: help, errors (exit 2, no traceback), runs and plots."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from emberfl import store
from emberfl.cli import main
from emberfl.metrics import read_metrics

RUN_FLAGS = [
    "--algorithm", "--dataset", "--data-dir", "--partition", "--alpha", "--shards-per-client",
    "--sigma", "--model", "--clients", "--sample-ratio", "--rounds", "--epochs",
    "--batch-size", "--lr", "--workers", "--device", "--seed", "--out", "--mu", "--server-lr",
    "--beta1", "--beta2", "--tau", "--config", "--no-progress", "--thread-pool", "--runtime",
    "--eval-every", "--nonfinite", "--threads", "--synthetic-alpha", "--synthetic-beta", "--quiet",
]  # fmt: skip

TINY = [
    "--clients", "6", "--sample-ratio", "0.5", "--rounds", "2", "--epochs", "2", "--lr", "0.1",
    "--no-progress", "--threads", "1",
]  # fmt: skip


def _run_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _python(
    *args: str, cwd: Path | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "emberfl", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
        check=False,
    )


def test_run_help_lists_every_flag_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    text = _run_help(capsys)
    for flag in RUN_FLAGS:
        assert flag in text, flag
    for shown in ("(default: fedavg)", "(default: 100)", "(default: digits)", "(default: 2)"):
        assert shown in text
    for choice in ("fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad"):
        assert choice in text
    for choice in ("iid", "dirichlet", "shards", "quantity", "fashion-mnist", "cifar10"):
        assert choice in text


def test_help_from_the_module_entry_point() -> None:
    result = _python("run", "--help")
    assert result.returncode == 0, result.stderr
    assert "--sample-ratio" in result.stdout and "--thread-pool" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["run", "--sample-ratio", "0"], "sample_ratio must lie in (0, 1]"),
        (["run", "--rounds", "0"], "rounds must be >= 1"),
        (["run", "--clients", "x"], "invalid int value"),
        (["run", "--dataset", "mnist"], "--data-dir"),
        (["run", "--dataset", "mnist", "--data-dir", "/nonexistent/x"], "does not exist"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "--samp", "0.5"], "unrecognized arguments"),
        (["run", "--config", "/nonexistent/c.toml"], "does not exist"),
        (["plot", "/nonexistent/run", "-o", "x.png"], "no metrics file"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    try:
        code = main([*argv, *(["--out", str(tmp_path / "r")] if argv[0] == "run" else [])])
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_missing_mnist_files_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    code = main(
        ["run", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--out",
         str(tmp_path / "r"), "--runtime", "thread"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_config_file_and_flags_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.toml").write_text('rounds = 5\nalgorithm = "fedprox"\nmu = 0.5\n')
    out = tmp_path / "run"
    code = main(
        ["run", "--config", str(tmp_path / "c.toml"), *TINY, "--thread-pool", "--out", str(out)]
    )
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    # rounds from the flags (2) beat the file's 5; mu and algorithm come from the file.
    assert (config["rounds"], config["algorithm"], config["mu"]) == (2, "fedprox", 0.5)
    assert config["runtime"] == "thread" and config["progress"] is False
    printed = capsys.readouterr().out
    assert "round  accuracy      loss  seconds" in printed
    assert "final accuracy:" in printed
    assert read_metrics(out)["round"].tolist() == [1.0, 2.0]


def test_plot_command_writes_a_png(tmp_path: Path) -> None:
    runs = []
    for seed in ("1", "2"):
        out = tmp_path / f"run{seed}"
        assert (
            main(["run", *TINY, "--thread-pool", "--quiet", "--seed", seed, "--out", str(out)]) == 0
        )
        runs.append(str(out))
    png = tmp_path / "curves.png"
    assert main(["plot", *runs, "-o", str(png), "--labels", "a", "b"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", runs[0], "-o", str(png), "--metric", "nope"]) == 2


@pytest.mark.slow
def test_end_to_end_in_a_subprocess_with_worker_processes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _python("run", *TINY, "--workers", "2", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "final accuracy:" in result.stdout
    for name in ("config.json", "metrics.csv", "model.safetensors"):
        assert (out / name).is_file(), name
    metrics = read_metrics(out)
    assert metrics["round"].tolist() == [1.0, 2.0] and metrics["accuracy"][-1] > 0.4
    assert set(store.load(out / "model.safetensors")) == {
        "net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias",
    }  # fmt: skip


@pytest.mark.slow
def test_the_command_leaves_no_process_behind(tmp_path: Path) -> None:
    """Worker processes, and multiprocessing's resource tracker, are gone (and reaped)
    when the command returns: nothing of its session is left, not even a zombie."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "emberfl", "run", *TINY, "--workers", "2", "--out",
         str(tmp_path / "run")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    left = []
    for pid in psutil.pids():
        with contextlib.suppress(psutil.Error, OSError):
            if pid != proc.pid and os.getsid(pid) == proc.pid:
                left.append(psutil.Process(pid).as_dict(["pid", "status", "cmdline"]))
    assert left == []


def test_default_out_dir_is_under_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", *TINY, "--runtime", "serial", "--quiet"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("-fedavg-digits")
    assert (run_dir / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "round  accuracy" not in out and "final accuracy:" in out
