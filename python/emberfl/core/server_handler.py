"""The server side of a federated-learning simulation, as in BlazeFL 3.0."""

from __future__ import annotations

from typing import Protocol, TypeVar

__all__ = ["BaseServerHandler"]

UplinkPackage = TypeVar("UplinkPackage")
DownlinkPackage = TypeVar("DownlinkPackage", covariant=True)


class BaseServerHandler(Protocol[UplinkPackage, DownlinkPackage]):
    """Samples clients, sends them the global state and folds their updates back in.

    Subclass it explicitly and implement ``downlink_package``, ``sample_clients``,
    ``is_stopped`` (or ``if_stop``, the name of earlier BlazeFL releases),
    ``global_update`` and ``load``.
    """

    def downlink_package(self) -> DownlinkPackage:
        """The package every client of the round receives."""
        raise NotImplementedError(f"{type(self).__name__} must implement downlink_package")

    def sample_clients(self) -> list[int]:
        """Ids of the clients that take part in the next round."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample_clients")

    def is_stopped(self) -> bool:
        """Whether training is over. Defaults to ``if_stop()`` when only that is defined."""
        if getattr(type(self), "if_stop", None) is not BaseServerHandler.if_stop:
            return self.if_stop()
        raise NotImplementedError(f"{type(self).__name__} must implement is_stopped")

    def if_stop(self) -> bool:
        """Alias of :meth:`is_stopped` (the name used by earlier BlazeFL releases)."""
        return self.is_stopped()

    def global_update(self, buffer: list[UplinkPackage]) -> None:
        """Fold a round's uplink packages into the global state."""
        raise NotImplementedError(f"{type(self).__name__} must implement global_update")

    def load(self, payload: UplinkPackage) -> bool:
        """Take one uplink package; return True when that completed a global update."""
        raise NotImplementedError(f"{type(self).__name__} must implement load")
