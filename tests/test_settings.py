"""Settings declared once: the config keys, the ``emberfl run`` flags, their checks and
the settings reference all come from the same declarations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emberfl.cli import build_parser, main
from emberfl.config import (
    RESUME_SETTINGS,
    SETTINGS,
    ConfigError,
    SimulationConfig,
    settings_reference,
)
from emberfl.contrib.registry import ALGORITHM_SETTINGS, ALGORITHM_SPECS
from emberfl.core.checks import check_positive_number
from emberfl.core.setting import Setting
from emberfl.data import DATA_SETTINGS

ROOT = Path(__file__).resolve().parents[1]


def _run_flags() -> dict[str, str]:
    """``emberfl run``'s flags and the setting (dest) each one sets."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    run = sub.choices["run"]  # type: ignore[index]
    return {flag: action.dest for action in run._actions for flag in action.option_strings}


def test_the_settings_reference_is_made_from_the_declarations() -> None:
    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert text == settings_reference(), "run: python -m emberfl.config > docs/settings.md"
    for name, setting in SETTINGS.items():
        assert f"| `{name}` |" in text and setting.help.split("(")[0].strip() in text


def test_every_setting_has_its_flag_and_no_flag_lacks_a_setting() -> None:
    flags = _run_flags()
    for name, setting in SETTINGS.items():
        flag = setting.negative_flag or setting.cli_flag
        assert flags.get(flag) == name, f"{name}: flag {flag} missing"
    others = {"-h", "--help", "--config", "--thread-pool", "-q", "--quiet"}
    assert {f for f, dest in flags.items() if dest not in SETTINGS} <= others


def test_owned_settings_come_from_their_algorithms_and_data_sets() -> None:
    for algorithm in ALGORITHM_SPECS.values():
        for setting in algorithm.settings:
            assert SETTINGS[setting.name] is setting
            assert setting.owner is not None and algorithm.name in setting.owner
    for setting in (*DATA_SETTINGS, *ALGORITHM_SETTINGS):
        assert SETTINGS[setting.name] is setting
    assert SETTINGS["mu"].owner == "fedprox"


def test_values_are_checked_by_the_declared_check_on_every_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Command line: exit status 2 and the setting's own message.
    assert main(["run", "--mu", "-1", "--out", str(tmp_path / "r")]) == 2
    assert "mu must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    # Config file, and the library.
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"server-lr": 0}), encoding="utf-8")
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "server_lr must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="beta1 must lie in"):
        SimulationConfig(beta1=1.0).validate()
    with pytest.raises(ConfigError, match="setting 'mu' must be a number"):
        SimulationConfig(mu="big")
    with pytest.raises(ConfigError, match="unknown setting 'mu_'"):
        SimulationConfig.from_mapping({"mu_": 1.0})


def test_an_algorithm_setting_reaches_the_run_and_its_record(tmp_path: Path) -> None:
    argv = ["run", "--algorithm", "fedprox", "--mu", "0.3", "--rounds", "1", "--clients", "10"]
    assert main([*argv, "--no-progress", "-q", "--out", str(tmp_path / "r")]) == 0
    record = json.loads((tmp_path / "r" / "config.json").read_text(encoding="utf-8"))
    assert record["mu"] == 0.3 and record["algorithm"] == "fedprox"
    assert set(SETTINGS) <= set(record)
    config = SimulationConfig.from_mapping({"algorithm": "fedprox", "mu": 0.3})
    assert config.mu == 0.3 and config.options["mu"] == 0.3
    assert config.to_dict()["mu"] == 0.3


def test_resume_settings_are_the_execution_settings() -> None:
    assert set(RESUME_SETTINGS) == {
        "workers",
        "threads",
        "runtime",
        "batch_clients",
        "progress",
        "checkpoint_every",
        "rank_timeout",
    }


def test_a_setting_coerces_and_checks_its_type() -> None:
    lr = Setting("lr", float, 0.1, "learning rate", "model and training", check_positive_number)
    assert lr.coerce(1) == 1.0 and isinstance(lr.coerce(1), float)
    with pytest.raises(ConfigError, match="must be a number"):
        lr.coerce(True)
    with pytest.raises(ConfigError, match="lr must be a finite number > 0"):
        lr.validate(float("nan"))
    rounds = SETTINGS["rounds"]
    assert rounds.coerce(3.0) == 3
    with pytest.raises(ConfigError, match="must be an integer"):
        rounds.coerce(2.5)
