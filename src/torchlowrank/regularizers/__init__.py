"""Rank regularizers for dense training: Q3R (DESIGN §4.6) and a nuclear-norm baseline.

Both take a model (layers chosen by ``targets``, PEFT semantics) and are used as
``loss.backward(); reg.step(); optimizer.step()``; ``reg.value()`` is the differentiable penalty.
"""

from .nuclear import NuclearNorm
from .q3r import Q3R, q3r_operator, q3r_reweight, smoothed_logdet

__all__ = ["Q3R", "NuclearNorm", "q3r_operator", "q3r_reweight", "smoothed_logdet"]
