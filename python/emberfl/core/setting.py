"""A setting of a run, declared once where it belongs.

A :class:`Setting` holds everything about one value a user can set: its name (the
config-file key; ``--name-with-dashes`` on the command line), type, default, the check
it must pass, its help text, and the group (or algorithm, or partitioner) it belongs
to. ``emberfl.config`` builds the configuration's fields, the ``emberfl run`` flags,
the config-file validation and the settings reference (docs/settings.md) from these
declarations, so a new algorithm's hyper-parameter is one ``Setting`` in its module.

Checks are functions ``check(value, name)`` that return the value (perhaps converted)
or raise ``TypeError``/``ValueError`` worded with the name (:mod:`emberfl.core.checks`):
the same functions guard the library's constructors, so a value means the same thing
on either path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Check", "ConfigError", "Setting"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting."""


#: ``check(value, name)``: the value if it is valid; ``TypeError``/``ValueError`` if not.
Check = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Setting:
    """One user-facing setting.

    ``type`` is ``int``, ``float``, ``str`` or ``bool``; ``optional`` admits ``None``
    (for "derived from other settings", said in ``help``). ``group`` heads the
    setting's section in ``emberfl run --help`` and the settings reference; ``owner``
    names what reads it when that is not every run (an algorithm, a partitioner), and
    the help text says so. ``choices`` are checked and listed; a callable is read when
    needed (registries filled later); with a ``check`` as well, the choices are the
    canonical values the command line offers and the check decides what else a config
    file may spell (a data set's aliases). ``flag`` is the command-line spelling (default
    ``--name-with-dashes``; ``""`` for a setting only config files set);
    ``negative_flag`` a ``store_false`` flag for a bool that defaults to true.
    ``resumable``: ``emberfl resume`` may change it, because it decides how the rounds
    run, not what they compute.
    """

    name: str
    type: type
    default: Any
    help: str
    group: str
    check: Check | None = None
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    optional: bool = False
    owner: str | None = None
    metavar: str | None = None
    flag: str | None = None
    negative_flag: str | None = None
    resumable: bool = False
    default_text: str | None = None

    @property
    def cli_flag(self) -> str:
        """The ``emberfl run`` flag ("" when none)."""
        if self.flag is not None:
            return self.flag
        if self.negative_flag is not None:
            return ""
        return "--" + self.name.replace("_", "-")

    def described(self) -> str:
        """The help text, naming the owner unless the text already does."""
        if self.owner is None or self.owner.split(",")[0] in self.help.lower():
            return self.help
        return f"{self.help} [{self.owner}]"

    def choice_list(self) -> tuple[str, ...] | None:
        choices = self.choices
        return choices() if callable(choices) else choices

    def shown_default(self) -> str:
        """The default as help texts and the reference show it."""
        if self.default_text is not None:
            return self.default_text
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        return "none" if self.default is None else str(self.default)

    def coerce(self, value: Any) -> Any:
        """``value`` of this setting's type (an int given as 3.0 becomes 3), checked by
        :attr:`check` and :attr:`choices`; :class:`ConfigError` naming the setting."""
        import os

        key = self.name
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"setting {key!r} cannot be null")
        if self.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"setting {key!r} must be true or false, got {value!r}")
        elif self.type is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"setting {key!r} must be an integer, got {value!r}")
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"setting {key!r} must be a number, got {value!r}")
            value = float(value)
        elif self.type is str:
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str):
                raise ConfigError(f"setting {key!r} must be a string, got {value!r}")
        else:  # pragma: no cover - a declaration error, caught by the tests
            raise AssertionError(f"setting {key}: unsupported type {self.type!r}")
        return value

    def validate(self, value: Any) -> None:
        """:class:`ConfigError` naming the setting when ``value`` fails its check."""
        if value is None:
            return
        choices = self.choice_list()
        if choices is not None and self.check is None and value not in choices:
            raise ConfigError(f"unknown {self.name} {value!r}; choose one of: {', '.join(choices)}")
        if self.check is not None:
            try:
                self.check(value, self.name)
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc)) from None
