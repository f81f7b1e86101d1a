"""The ``emberfl`` command line: ``emberfl run``, ``emberfl resume`` and ``emberfl plot``.

``emberfl run`` with no arguments is the quick start (FedAvg on the embedded digits
data). Settings come from the defaults, then ``--config FILE`` (JSON or TOML), then
the flags given, each overriding the one before. Bad settings, missing data, a run
directory that another ``emberfl`` process is writing and a symbolic link where a run
file belongs end the command with a one-line message and exit status 2. Ctrl-C
(SIGINT) stops a run with exit status 130 and SIGTERM with 143, after stopping the
workers and removing the temporary files; the last checkpoint stays valid, and
``emberfl resume DIR`` continues from it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any, TextIO

__all__ = ["build_parser", "main"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is.

    A KeyboardInterrupt so that the runtime stops the workers at once, as on Ctrl-C,
    instead of waiting for the round's clients.
    """


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_stops_cleanly() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _run_parser(sub: Any) -> argparse.ArgumentParser:
    from emberfl.config import GROUPS, SETTINGS

    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run a federated simulation (no arguments: the quick start)",
        description=(
            "Run a federated-learning simulation and write its run directory\n"
            "(config.json, metrics.csv, model.safetensors).\n\n"
            "Without arguments: FedAvg on scikit-learn's digits, 100 clients, in well\n"
            "under a minute on two CPU cores. Settings: the defaults below, then\n"
            "--config FILE, then the flags given."
        ),
        formatter_class=_Formatter,
        # Flags must not be abbreviated: --config values are merged by exact name.
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    groups["experiment"].add_argument(
        "--config",
        metavar="FILE",
        help="JSON or TOML file of settings (same names as the flags); flags override it",
    )
    # Every flag is made from its setting's declaration. The defaults live in
    # SimulationConfig; argparse only shows them, so that a flag left out cannot
    # override a value from --config.
    for setting in SETTINGS.values():
        group = groups[setting.group]
        help = setting.described()
        if setting.default is not None or setting.default_text is not None:
            help = f"{help} (default: {setting.shown_default()})"
        if setting.negative_flag is not None:
            group.add_argument(
                setting.negative_flag, dest=setting.name, action="store_false", help=help
            )
            continue
        types: dict[type, Any] = {int: int, float: float, str: str}
        group.add_argument(
            setting.cli_flag,
            dest=setting.name,
            type=types[setting.type],
            choices=setting.choice_list(),
            metavar=setting.metavar,
            help=help,
        )
    groups["execution"].add_argument(
        "--thread-pool",
        dest="runtime",
        action="store_const",
        const="thread",
        help="same as --runtime thread",
    )
    groups["execution"].add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the final accuracy, not the per-round table",
    )
    return p


def _resume_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "resume",
        help="continue an interrupted run from its last checkpoint",
        description=(
            "Continue the run in RUN_DIR from its last checkpoint to its configured number\n"
            "of rounds, with the settings in its config.json (metrics.csv is cut back to\n"
            "the checkpoint and appended to). Only execution settings may change."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--workers", type=int, help="parallel clients (as for run)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads per client (default: the run's own, from its config.json; "
        "another count gives other bits from here on)",
    )
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint interval")
    p.add_argument(
        "--rank-timeout", type=float, metavar="SECONDS", help="silent-rank timeout (as for run)"
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no per-round progress bar"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final accuracy")
    return p


def _plot_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "plot",
        help="plot runs' metrics (accuracy vs round) to a PNG",
        description="Draw one curve per run directory, on shared axes, into a PNG file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to plot")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="the PNG file to write")
    p.add_argument(
        "--metric", default="accuracy", help="metrics.csv column on the y axis (default: accuracy)"
    )
    p.add_argument("--x", default="round", help="metrics.csv column on the x axis (default: round)")
    p.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="legend labels, one per run (default: the directory names)",
    )
    p.add_argument("--title", help="figure title (default: none)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``emberfl`` argument parser (subcommands ``run`` and ``plot``)."""
    parser = argparse.ArgumentParser(
        prog="emberfl",
        description="Fast, reproducible federated-learning simulation on one machine.",
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"emberfl {_version()}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level of the emberfl library",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _run_parser(sub)
    _resume_parser(sub)
    _plot_parser(sub)
    return parser


def _version() -> str:
    from emberfl import __version__

    return __version__


def _fail(message: str) -> int:
    print(f"emberfl: error: {message}", file=sys.stderr)
    return EXIT_USAGE


class _Table:
    """The per-round table printed while a run goes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.header_done = False

    def row(self, m: Any) -> None:
        if not self.header_done:
            print(f"{'round':>5}  {'accuracy':>8}  {'loss':>8}  {'seconds':>7}", file=self.out)
            self.header_done = True
        print(
            f"{m.round:>5}  {m.accuracy:>8.4f}  {m.loss:>8.4f}  {m.round_seconds:>7.2f}",
            file=self.out,
            flush=True,
        )


def _cmd_run(args: argparse.Namespace) -> int:
    from emberfl.config import ConfigError, SimulationConfig, load_config_file
    from emberfl.simulation import Simulation

    started = time.perf_counter()
    settings = {
        k: v for k, v in vars(args).items() if k not in ("command", "config", "log_level", "quiet")
    }
    try:
        # A bar per round is useful on a terminal; in a log file it is only noise.
        config = SimulationConfig(progress=sys.stderr.isatty())
        if getattr(args, "config", None) is not None:
            config = SimulationConfig.from_mapping(load_config_file(args.config), config)
        config = SimulationConfig.from_mapping(settings, config)
        simulation = Simulation(config)
    except ConfigError as exc:
        return _fail(str(exc))
    return _execute(simulation, args, started)


def _cmd_resume(args: argparse.Namespace) -> int:
    from emberfl.checkpoint import CheckpointError
    from emberfl.config import ConfigError
    from emberfl.fileio import UnsafePathError
    from emberfl.simulation import Simulation

    started = time.perf_counter()
    settings = {
        k: v
        for k, v in vars(args).items()
        if k in ("workers", "threads", "progress", "rank_timeout")
    }
    if "checkpoint_every" in vars(args):
        settings["checkpoint_every"] = args.checkpoint_every
    settings.setdefault("progress", sys.stderr.isatty())
    try:
        simulation = Simulation.for_resume(args.run_dir, **settings)
    except (ConfigError, CheckpointError, UnsafePathError) as exc:
        return _fail(str(exc))
    return _execute(simulation, args, started)


def _execute(simulation: Any, args: argparse.Namespace, started: float) -> int:
    from emberfl.core.errors import RankFailedError

    try:
        return _run_prepared(simulation, args, started)
    except RankFailedError as exc:  # another rank of a torchrun job: one line naming it
        print(f"emberfl: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _run_prepared(simulation: Any, args: argparse.Namespace, started: float) -> int:
    from emberfl.checkpoint import CheckpointError, RunDirLockedError
    from emberfl.config import ConfigError
    from emberfl.data import DatasetError
    from emberfl.fileio import UnsafePathError

    config = simulation.config
    table = _Table(sys.stdout)
    with simulation:
        try:
            simulation.prepare()
        except (
            ConfigError,
            DatasetError,
            CheckpointError,
            RunDirLockedError,
            UnsafePathError,
        ) as exc:
            # RunDirLockedError: another `emberfl run/resume` is writing the directory;
            # UnsafePathError: a symbolic link where a run file belongs.
            simulation.abort(f"{type(exc).__name__}: {exc}")
            return _fail(str(exc))
        if simulation.following:  # under torchrun, rank 0 reports for every rank
            simulation.run()
            return 0
        start = (
            f"resuming from round {simulation.resumed_from}"
            if simulation.resumed_from is not None
            else "starting over (no checkpoint)"
            if simulation.resume
            else ""
        )
        print(
            f"{config.algorithm} on {config.dataset_key}: {config.clients} clients "
            f"({config.clients_per_round} per round), model {config.model_name}, "
            f"{config.rounds} rounds -> {simulation.run_dir}" + (f"; {start}" if start else ""),
            flush=True,
        )
        try:
            result = simulation.run(None if getattr(args, "quiet", False) else table.row)
        except UnsafePathError as exc:  # a link planted while the run goes
            simulation.abort(f"{type(exc).__name__}: {exc}")
            return _fail(str(exc))
    wall = time.perf_counter() - started
    acc = result.final_accuracy
    acc_text = "n/a" if math.isnan(acc) else f"{acc:.4f}"
    print(
        f"final accuracy: {acc_text} after {simulation.round} rounds "
        f"({result.seconds:.1f} s of rounds, {wall:.1f} s with set-up); run directory: "
        f"{simulation.run_dir}",
        flush=True,
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from emberfl.fileio import UnsafePathError
    from emberfl.plot import plot_runs

    try:
        out = plot_runs(
            args.run_dirs, args.output, args.metric, x=args.x, labels=args.labels, title=args.title
        )
    except (FileNotFoundError, ValueError, UnsafePathError) as exc:
        return _fail(str(exc))
    except ImportError as exc:
        return _fail(str(exc))
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``emberfl`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        with _sigterm_stops_cleanly():
            if args.command == "run":
                return _cmd_run(args)
            if args.command == "resume":
                return _cmd_resume(args)
            return _cmd_plot(args)
    except _Terminated:
        print("emberfl: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("emberfl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def console_main() -> int:
    """The ``emberfl`` console script (and ``python -m emberfl``): :func:`main`, then
    multiprocessing's helper processes of this process are stopped and reaped.

    The spawn start method starts a resource tracker (and ``forkserver`` a fork server)
    that would otherwise exit only after this process, re-parented to init: a command
    must leave no process behind. :func:`main` itself leaves them alone, because a
    program that calls it may go on using multiprocessing.
    """
    try:
        return main()
    finally:
        _stop_multiprocessing_helpers()


def _stop_multiprocessing_helpers() -> None:
    from multiprocessing import forkserver, resource_tracker

    # Private but stable since Python 3.8: each closes its helper's pipe and waits for it.
    for module, name in ((forkserver, "_forkserver"), (resource_tracker, "_resource_tracker")):
        stop = getattr(getattr(module, name, None), "_stop", None)
        if callable(stop):
            with contextlib.suppress(Exception):
                stop()
