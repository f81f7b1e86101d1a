"""Differential privacy: client-level DP-FedAvg (central, adaptive clipping, local),
accounted with Google's ``dp-accounting`` (``pip install 'emberfl[privacy]'``).

* :mod:`~emberfl.contrib.privacy.mechanism` -- the clipped client step and the
  server's noised release (the update rules);
* :mod:`~emberfl.contrib.privacy.accountant` -- the DP event of a round and ε;
* :mod:`~emberfl.contrib.privacy.noise` -- reproducible or OS-entropy Gaussian noise;
* :mod:`~emberfl.contrib.privacy.settings` -- the ``--dp`` registry and settings.
"""

from emberfl.contrib.privacy.accountant import ACCOUNTANTS, ClientAccountant
from emberfl.contrib.privacy.clipping import clip_update, l2_norm
from emberfl.contrib.privacy.mechanism import (
    ClientLevelDP,
    PrivateBatchedStep,
    PrivateClientUpdate,
    PrivateDownlinkPackage,
    PrivateUplinkPackage,
    privatize,
    update_noise_multiplier,
)
from emberfl.contrib.privacy.noise import NOISE_SOURCES, gaussian, seeded_gaussian
from emberfl.contrib.privacy.settings import (
    MECHANISMS,
    PRIVACY_SETTINGS,
    check_privacy,
    privacy_record,
    private_client_step,
    server_privacy,
)

__all__ = [
    "ACCOUNTANTS",
    "MECHANISMS",
    "NOISE_SOURCES",
    "PRIVACY_SETTINGS",
    "ClientAccountant",
    "ClientLevelDP",
    "PrivateBatchedStep",
    "PrivateClientUpdate",
    "PrivateDownlinkPackage",
    "PrivateUplinkPackage",
    "check_privacy",
    "clip_update",
    "gaussian",
    "l2_norm",
    "privacy_record",
    "private_client_step",
    "privatize",
    "seeded_gaussian",
    "server_privacy",
    "update_noise_multiplier",
]
