"""Optimizers for low-rank training (DESIGN §4.5).

``LowRankSGD`` / ``LowRankAdam``: geometry-aware (dynamical low-rank) heavy ball and Adam for
LowRankLinear / LowRankConv2d layers, rank adaptive with ``tau > 0``. ``GaLoreAdamW``: the GaLore
baseline (gradient projection), matching the ``galore-torch`` package's update.
"""

from .galore import GaLoreAdamW
from .geometric import (
    LowRankAdam,
    LowRankSGD,
    NonFiniteStepError,
    lowrank_units,
    reshard_after_rank_change,
    resize_to_state_dict,
)

__all__ = [
    "LowRankSGD",
    "LowRankAdam",
    "NonFiniteStepError",
    "GaLoreAdamW",
    "resize_to_state_dict",
    "lowrank_units",
    "reshard_after_rank_change",
]
