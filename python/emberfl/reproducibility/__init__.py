"""Reproducibility: seeding, isolated generator suites, per-client streams, snapshots.

The names :func:`seed_everything`, :func:`setup_reproducibility`, :class:`RNGSuite`,
:func:`create_rng_suite` and :class:`RandomStateSnapshot` behave as in BlazeFL. On
top of them, every (seed, client id, round) triple has a stream of its own
(:func:`client_seed`, :func:`client_rng_suite`, :func:`seed_client`), and generator
states convert to tensors (:func:`rng_suite_state`, :func:`restore_rng_suite`) so
they can be checkpointed in store files.
"""

from emberfl.reproducibility.generator import (
    RNGSuite,
    check_client_id,
    check_seed,
    create_rng_suite,
    setup_reproducibility,
)
from emberfl.reproducibility.snapshot import RandomStateSnapshot, seed_everything
from emberfl.reproducibility.streams import (
    client_rng_suite,
    client_seed,
    restore_rng_suite,
    rng_suite_state,
    seed_client,
)

__all__ = [
    "RNGSuite",
    "RandomStateSnapshot",
    "check_client_id",
    "check_seed",
    "client_rng_suite",
    "client_seed",
    "create_rng_suite",
    "restore_rng_suite",
    "rng_suite_state",
    "seed_client",
    "seed_everything",
    "setup_reproducibility",
]
