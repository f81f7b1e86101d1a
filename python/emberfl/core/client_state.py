"""Per-client persistent state kept on disk, one store file per client.

Algorithms such as SCAFFOLD keep a vector per client between rounds. With thousands
of virtual clients those vectors cannot all live in RAM, so a
:class:`ClientStateStore` keeps each client's tensors in ``<root>/<cid>.safetensors``
and maps a file only while that client runs. Files are written atomically (temporary
file + rename, by :func:`emberfl.store.save`), so a crash mid-round leaves either the
old or the new state of a client, never a torn file. The directory may be in a run
directory others can write: neither it nor a state file is used through a symbolic
link (:class:`~emberfl.fileio.UnsafePathError` names it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from emberfl import store
from emberfl.fileio import refuse_symlink
from emberfl.reproducibility import check_client_id

__all__ = ["ClientStateStore"]

_FILE_RE = re.compile(r"(0|[1-9][0-9]*)\.safetensors")


class ClientStateStore:
    """A directory of per-client tensor files: ``<root>/<cid>.safetensors``.

    The object holds nothing but its path, so it pickles as a path and every worker
    process or thread can read and write the same store. A client's state is read and
    written only by that client's task, and a round never runs one client twice at the
    same time, so no locking is needed.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if refuse_symlink(self.root) and not self.root.is_dir():
            raise NotADirectoryError(f"client state directory {self.root} is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, cid: int) -> Path:
        """The file that holds client ``cid``'s state (it may not exist yet)."""
        return self.root / f"{check_client_id(cid)}.safetensors"

    def __contains__(self, cid: object) -> bool:
        try:
            valid = check_client_id(cid)
        except (TypeError, ValueError):
            return False
        return self._has(self.path(valid))

    @staticmethod
    def _has(path: Path) -> bool:
        """Whether the state file ``path`` exists; a symbolic link there is refused."""
        return refuse_symlink(path) and path.is_file()

    def load(self, cid: int) -> dict[str, torch.Tensor] | None:
        """Client ``cid``'s tensors, or ``None`` when it has no state yet.

        The tensors view a private (copy-on-write) mapping of the file: writing into
        them never changes the file, and they cost no memory until touched.
        """
        path = self.path(cid)
        if not self._has(path):
            return None
        return store.load(path)

    def metadata(self, cid: int) -> dict[str, str] | None:
        """The string metadata saved with client ``cid``'s state, or ``None``."""
        path = self.path(cid)
        if not self._has(path):
            return None
        return dict(store.open_file(path).metadata)

    def save(
        self,
        cid: int,
        tensors: Mapping[str, torch.Tensor | np.ndarray],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Replace client ``cid``'s state with ``tensors`` (atomically)."""
        store.save(self.path(cid), tensors, metadata=metadata)

    def delete(self, cid: int) -> None:
        """Forget client ``cid``'s state (no error when there is none)."""
        self.path(cid).unlink(missing_ok=True)

    def clients(self) -> list[int]:
        """Ids of the clients that have a state file, sorted."""
        found = []
        for entry in os.scandir(self.root):
            m = _FILE_RE.fullmatch(entry.name)
            if m is not None and self._has(Path(entry.path)):
                found.append(int(m.group(1)))
        return sorted(found)

    def __len__(self) -> int:
        return len(self.clients())

    def __repr__(self) -> str:
        return f"ClientStateStore({str(self.root)!r})"
