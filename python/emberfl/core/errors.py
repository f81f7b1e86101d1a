"""Exceptions raised by the client runtimes."""

from __future__ import annotations

__all__ = ["ClientError", "ClientTimeoutError", "RankFailedError", "WorkerCrashedError"]


class ClientError(RuntimeError):
    """A client's work raised; carries the client id and the worker's traceback.

    ``str(error)`` includes the formatted traceback from the process or thread that
    ran the client, so the cause is visible where the parent reports it.
    """

    def __init__(self, cid: int, message: str, remote_traceback: str = "") -> None:
        self.cid = cid
        self.message = message
        self.remote_traceback = remote_traceback
        text = f"client {cid} failed: {message}"
        if remote_traceback:
            text += f"\n\nTraceback from the worker:\n{remote_traceback.rstrip()}"
        super().__init__(text)

    def __reduce__(self) -> tuple[type[ClientError], tuple[int, str, str]]:
        return (type(self), (self.cid, self.message, self.remote_traceback))


class ClientTimeoutError(ClientError):
    """A client ran longer than the trainer's ``client_timeout``; its worker was stopped."""


class WorkerCrashedError(RuntimeError):
    """A worker process died (killed, out of memory, crashed) while running a client."""

    def __init__(self, cid: int, exitcode: int | None, detail: str = "") -> None:
        self.cid = cid
        self.exitcode = exitcode
        how = _describe_exit(exitcode)
        text = f"the worker process running client {cid} died ({how})"
        if detail:
            text += f"; {detail}"
        super().__init__(text)

    def __reduce__(self) -> tuple[type[WorkerCrashedError], tuple[int, int | None]]:
        return (type(self), (self.cid, self.exitcode))


class RankFailedError(RuntimeError):
    """Another rank of a multi-rank job failed, died or went silent; ``rank`` names it
    (``None`` when the job's store itself is gone) and ``step`` says where this rank was."""

    def __init__(self, rank: int | None, reason: str, step: str) -> None:
        self.rank = rank
        self.reason = reason
        self.step = step
        what = reason if rank is None else f"rank {rank} {reason}"
        super().__init__(f"{what}; this rank stopped while {step}")

    def __reduce__(self) -> tuple[type[RankFailedError], tuple[int | None, str, str]]:
        return (type(self), (self.rank, self.reason, self.step))


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " -- often the out-of-memory killer" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"
