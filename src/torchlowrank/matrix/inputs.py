"""User inputs as tensors: the estimators accept NumPy arrays as well as torch tensors."""

from __future__ import annotations

import torch

__all__ = ["as_tensor"]


def as_tensor(x):
    """A NumPy array becomes a tensor sharing its memory; anything else is returned unchanged (the
    callers check types and shapes and say what they expect)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return x
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x
