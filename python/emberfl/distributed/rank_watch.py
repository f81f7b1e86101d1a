"""Which ranks of a torch.distributed job are alive, and where each has got to.

Collectives have one timeout for everything: long enough for the slowest round's
training and a rank that died waits that long; short, and a slow round kills the job.
So ranks never enter a collective to *wait* for each other: they meet first through
the job's key-value store (c10d's ``Store``, which torchrun keeps in its agent, so it
outlives any worker), where every rank

* beats: a thread increments ``beat/<rank>`` every ``interval`` seconds;
* arrives: ``at/<step>`` counts the ranks that reached a step;
* posts a failure: ``failed`` holds the first rank's error, for every other to raise.

:meth:`RankWatch.wait` returns when the keys it waits for exist, and raises
:class:`~emberfl.core.errors.RankFailedError` naming the rank as soon as any rank
posts a failure or a rank's beat stops for ``timeout`` seconds (killed, stopped, its
node lost) -- so a dead rank stops the others within seconds, however long rounds are.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from emberfl.core.errors import RankFailedError

__all__ = ["RankWatch"]

_FAILED = "failed"


class RankWatch:
    """This rank's heartbeat, and waits on the other ranks that notice dead ones.

    ``store`` is the job's c10d store (``None``: the default process group's);
    ``namespace`` separates jobs, and a restarted job's attempts, sharing a store.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        store: Any = None,
        namespace: str = "emberfl",
        timeout: float = 15.0,
        interval: float = 0.5,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if timeout <= interval:
            raise ValueError(f"timeout ({timeout} s) must exceed the beat interval ({interval} s)")
        if store is None:
            store = dist.distributed_c10d._get_default_store()
        self.rank, self.world_size = rank, world_size
        self.timeout, self.interval = timeout, interval
        self._store = dist.distributed_c10d.PrefixStore(f"{namespace}/", store)
        self._store.add(f"beat/{rank}", 1)  # exists before anyone can wait on it
        self._stop = threading.Event()
        self._beater = threading.Thread(target=self._beat, name="emberfl-beat", daemon=True)
        self._beater.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._store.add(f"beat/{self.rank}", 1)
            except Exception:  # the store is gone: the job is over, waits will say why
                return

    # -- what this rank tells the others ------------------------------------------

    def post(self, key: str, value: str) -> None:
        self._store.set(key, value)

    def arrive(self, step: str) -> None:
        """Count this rank as having reached ``step``."""
        self._store.add(f"at/{step}", 1)

    def fail(self, message: str) -> None:
        """Tell every rank that this one failed (the first failure posted wins)."""
        with contextlib.suppress(Exception):
            self._store.compare_set(_FAILED, "", f"{self.rank}\n{message}")

    # -- waiting on them ----------------------------------------------------------

    def get(self, key: str, rank: int, what: str) -> bytes:
        """The value ``rank`` posts under ``key``, once it exists."""
        self._wait(lambda: bool(self._store.check([key])), [rank], what)
        return bytes(self._store.get(key))

    def meet(self, step: str, what: str) -> None:
        """Arrive at ``step`` and return once every rank has."""
        self.arrive(step)
        key = f"at/{step}"
        self._wait(lambda: self._store.add(key, 0) >= self.world_size, range(self.world_size), what)

    def _wait(self, done: Any, ranks: Sequence[int], what: str) -> None:
        last: dict[int, tuple[int, float]] = {}
        pause, next_check = 0.0005, 0.0
        while True:
            try:
                if done():
                    return
                if self._store.check([_FAILED]):
                    rank, _, message = bytes(self._store.get(_FAILED)).decode().partition("\n")
                    raise RankFailedError(int(rank), f"failed ({message})", what)
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + self.interval
                    for r in ranks:
                        if r == self.rank:
                            continue
                        beats = self._store.add(f"beat/{r}", 0)
                        seen = last.get(r)
                        if seen is None or seen[0] != beats:
                            last[r] = (beats, now)
                        elif now - seen[1] > self.timeout:
                            raise RankFailedError(
                                r, f"has been silent for {self.timeout:g} s (dead or hung)", what
                            )
            except RankFailedError:
                raise
            except Exception as exc:  # the store itself is gone (its host died)
                raise RankFailedError(None, f"the job's store failed: {exc}", what) from exc
            # Short waits (a round's meeting) end within a millisecond or two; long ones
            # (a rank still training) cost each rank at most 100 store requests a second.
            time.sleep(pause)
            pause = min(pause * 1.5, 0.01)

    def explain(self, what: str) -> RankFailedError | None:
        """Why a collective failed: another rank's posted failure, or the rank that
        went silent, waiting at most ``timeout`` (+ a beat) for either to show; None
        when every rank still beats (the failure was this rank's own)."""
        deadline = time.monotonic() + self.timeout + 2 * self.interval
        try:
            self._wait(lambda: time.monotonic() > deadline, range(self.world_size), what)
        except RankFailedError as exc:
            return exc
        return None

    def close(self) -> None:
        """Stop beating (the others will see this rank as silent if they still wait)."""
        self._stop.set()
        if self._beater.is_alive() and self._beater is not threading.current_thread():
            self._beater.join(timeout=2 * self.interval + 1)
