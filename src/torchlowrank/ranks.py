"""Rank measures of matrices and a per-layer spectrum table of a model.

- stable rank  = ||W||_F^2 / ||W||_2^2
- effective rank (Roy & Vetterli 2007) = exp(H(p)), p_i = s_i / sum(s)
- numerical rank at energy e = smallest k with sum_{i<=k} s_i^2 >= e * sum_i s_i^2

All measures accept a matrix, a conv kernel (out, in, kh, kw) reshaped to (out, in*kh*kw), or a
precomputed vector of singular values (1-D tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .layer_types import check_not_meta, matrix_view
from .linalg import check_finite, compute_dtype, truncated_svd
from .results import markdown_table
from .targets import find_targets

__all__ = [
    "as_matrix",
    "singular_values",
    "stable_rank",
    "effective_rank",
    "numerical_rank",
    "LayerSpectrum",
    "SpectrumTable",
    "spectrum",
    "layer_weight",
    "check_top_k",
    "weight_layers",
]


def as_matrix(W: torch.Tensor) -> torch.Tensor:
    """(out, in) stays; (out, in, *kernel) -> (out, in * prod(kernel)). Detached."""
    if W.ndim < 2:
        raise ValueError(f"expected a matrix or a conv kernel, got shape {tuple(W.shape)}")
    return W.detach().reshape(W.shape[0], -1)


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """All singular values, descending, in the compute dtype (float32, or float64 for float64 input)."""
    check_not_meta(W, "the weight")
    if W.ndim == 1:
        return W.detach().to(compute_dtype(W.dtype)).abs().sort(descending=True).values
    M = as_matrix(W)
    check_finite(M, "weight")
    M = M.to(compute_dtype(M.dtype))
    with torch.autocast(device_type=M.device.type, enabled=False):
        try:
            return torch.linalg.svdvals(M)
        except RuntimeError:  # LAPACK did not converge: fall back to float64
            return torch.linalg.svdvals(M.double()).to(M.dtype)


def stable_rank(W: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2 (0 for the zero matrix). W: matrix, conv kernel, or singular values."""
    s = singular_values(W)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    return float((s**2).sum() / s[0] ** 2)


def effective_rank(W: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalised singular values (0 for the zero matrix)."""
    s = singular_values(W).double()
    total = s.sum()
    if total == 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(W: torch.Tensor, energy: float = 0.99) -> int:
    """Smallest k whose top-k singular values hold ``energy`` of ||W||_F^2 (0 for the zero matrix)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s2 = singular_values(W).double() ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(s2, 0)
    # tolerance so that energy=1.0 does not depend on the last ulp of the sum
    k = int((cum < energy * total * (1 - 1e-12)).sum()) + 1
    return min(k, s2.numel())


def layer_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight matrix of a layer as spectra list it, or None if it has none
    (``torchlowrank.layer_types.MatrixView.tensor``).

    nn.Linear gives ``.weight``; Hugging Face ``Conv1D`` (GPT-2) gives ``weight.T``, the (out, in)
    matrix it applies; conv layers their kernel (out, in, *kernel); nn.Embedding its table
    (num, dim); factorized or adapted layers the weight they apply through a ``dense_weight()``
    method (see ``LowRankLinear``).
    """
    view = matrix_view(module)
    return None if view is None else view.tensor()


@dataclass
class LayerSpectrum:
    name: str
    kind: str
    shape: tuple[int, ...]
    stable_rank: float
    effective_rank: float
    numerical_rank: int
    top_singular_values: list[float] = field(default_factory=list)

    @property
    def full_rank(self) -> int:
        return min(self.shape[0], math.prod(self.shape[1:]))


class SpectrumTable(list):
    """A list of :class:`LayerSpectrum` that prints as an aligned table (``str``) or Markdown."""

    columns = [
        "layer",
        "type",
        "shape",
        "full rank",
        "stable rank",
        "effective rank",
        "numerical rank",
        "top singular values",
    ]

    def rows(self) -> list[list]:
        return [
            [
                r.name,
                r.kind,
                "x".join(map(str, r.shape)),
                r.full_rank,
                round(r.stable_rank, 2),
                round(r.effective_rank, 2),
                r.numerical_rank,
                ", ".join(f"{v:.3g}" for v in r.top_singular_values),
            ]
            for r in self
        ]

    def to_markdown(self) -> str:
        return markdown_table(self.columns, self.rows())

    def __str__(self) -> str:
        rows = [self.columns] + [[str(c) for c in r] for r in self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.columns))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int (how many singular values to show), got {top_k!r}")


def matrix_spectrum(
    name: str, kind: str, W: torch.Tensor, top_k: int = 5, energy: float = 0.99
) -> LayerSpectrum:
    """Spectrum summary of one weight (matrix or conv kernel)."""
    check_top_k(top_k)
    try:
        s = singular_values(W)
    except ValueError as e:
        raise ValueError(f"layer {name!r}: {e}") from e
    return LayerSpectrum(
        name=name,
        kind=kind,
        shape=tuple(W.shape),
        stable_rank=stable_rank(s),
        effective_rank=effective_rank(s),
        numerical_rank=numerical_rank(s, energy),
        top_singular_values=[float(v) for v in s[:top_k]],
    )


def spectrum(model: nn.Module, top_k: int = 5, targets=None, energy: float = 0.99) -> SpectrumTable:
    """Per-layer table: name, type, shape, stable / effective / numerical rank, top singular values.

    Covers nn.Linear, HF Conv1D (as the (out, in) matrix it applies), nn.Conv* (kernel reshaped to
    out x in*k*k), nn.Embedding, and factorized / adapted layers (through their ``dense_weight()``).
    A weight shared by several modules (tied embeddings) is listed once, under its first name.
    ``targets``: as in :func:`find_targets`.
    """
    check_top_k(top_k)
    table = SpectrumTable()
    for name, module in weight_layers(model, targets):
        table.append(matrix_spectrum(name, type(module).__name__, layer_weight(module), top_k, energy))
    return table


def weight_layers(model: nn.Module, targets=None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer with a weight matrix (:func:`layer_weight`) selected by
    ``targets`` (as in :func:`find_targets`), each weight once: a weight shared by several modules
    (tied embeddings: GPT-2's ``transformer.wte`` and ``lm_head``, T5 / BART's ``shared``,
    ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head``) is listed under its first
    name only. A factorized or adapted layer (one with ``dense_weight()``) is its own entry, as the
    matrix it applies differs from its base weight's other holders. The one rule for
    :func:`spectrum` and ``diagnostics.SpectrumTracker``."""
    found = find_targets(model, targets, predicate=lambda m: matrix_view(m) is not None)
    out, seen = [], set()
    for name, module in found:
        view = matrix_view(module)
        key = id(module) if view.computed else id(view.param)
        if key not in seen:
            seen.add(key)
            out.append((name, module))
    return out


def top_singular_values(W: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest singular values (truncated SVD when k is small against the matrix)."""
    M = as_matrix(W)
    k = min(k, min(M.shape))
    return truncated_svd(M, k)[1]
