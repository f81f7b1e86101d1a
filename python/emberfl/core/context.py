"""Which client is being run right now, and its own random streams.

The runtimes set a :class:`ClientContext` around every call of a user's ``worker``,
in worker processes, worker threads and in-process runs alike, so client code can
ask for its id, round and a :class:`~emberfl.reproducibility.RNGSuite` derived from
``(seed, cid, round)`` without any of them being passed through the BlazeFL
signatures.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from emberfl import reproducibility
from emberfl.reproducibility import RNGSuite

__all__ = ["ClientContext", "client_scope", "current_client"]


@dataclass
class ClientContext:
    """The client being run: its id, the round, the trainer's seed and the device.

    ``round`` counts the trainer's ``local_process`` calls from 0.
    """

    cid: int
    round: int
    seed: int
    device: str
    _rng: RNGSuite | None = field(default=None, repr=False, compare=False)

    @property
    def rng(self) -> RNGSuite:
        """Generators seeded from ``(seed, cid, round)``, created on first use.

        The same triple gives the same streams whichever process or thread runs the
        client, which is what makes thread-pool runs reproducible.
        """
        if self._rng is None:
            self._rng = reproducibility.client_rng_suite(self.seed, self.cid, self.round)
        return self._rng


_CURRENT: contextvars.ContextVar[ClientContext | None] = contextvars.ContextVar(
    "emberfl_current_client", default=None
)


def current_client() -> ClientContext:
    """The :class:`ClientContext` of the client running in this thread.

    Raises ``RuntimeError`` outside a client's ``worker`` call.
    """
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError(
            "current_client() was called outside a client: it works only inside a "
            "trainer's worker while the runtime runs it"
        )
    return ctx


@contextmanager
def client_scope(ctx: ClientContext) -> Iterator[ClientContext]:
    """Make ``ctx`` the current client for the duration of the block."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
