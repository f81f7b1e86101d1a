"""emberfl: fast, reproducible federated-learning simulation on one machine.

Parameters travel between processes as memory-mapped safetensors files and are
aggregated by a multi-threaded Rust core (:mod:`emberfl.store`, :mod:`emberfl.aggregate`).
"""

from emberfl._core import __version__

__all__ = ["__version__"]
