"""The plain factorized baseline W = A B^T, trained with ordinary optimizers (DESIGN §4.5 baselines).

``FactorizedLinear``: A (out, r), B (in, r); y = (x B) A^T + b.
``FactorizedConv2d``: the kernel reshaped to (out, in*kh*kw) is A B^T; a conv with the r filters
B^T reshaped to (r, in, kh, kw), then a 1x1 conv with A.
Built from a dense layer (``from_linear`` / ``from_conv2d``) the factors are the balanced SVD
split A = U_r sqrt(S_r), B = V_r sqrt(S_r) (the best rank-r approximation). Unlike LowRankLinear
there is no orthonormality: heavy ball / Adam update A and B as two ordinary matrices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layer_types import check_rank, matrix_view, plain_conv_reason
from .layers import conv_geometry, factored_conv2d
from .linalg import truncated_svd
from .sharded import is_sharded_module
from .targets import Targets, find_targets, replace_module

__all__ = ["FactorizedLinear", "FactorizedConv2d", "factorize_ab"]


class _ABFactors(nn.Module):
    A: nn.Parameter
    B: nn.Parameter

    def _init_ab(self, m: int, n: int, rank: int, device, dtype) -> None:
        self.rank = rank
        self.A = nn.Parameter(torch.empty(m, rank, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(n, rank, device=device, dtype=dtype))

    @torch.no_grad()
    def _ab_from_dense(self, dense: torch.Tensor) -> None:
        U, S, Vh = truncated_svd(dense.reshape(dense.shape[0], -1), self.rank)
        root = S.sqrt()
        self.A.copy_(U * root)
        self.B.copy_(Vh.T * root)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix A B^T (differentiable)."""
        return self.A @ self.B.T


class FactorizedLinear(_ABFactors):
    """y = x B A^T + b; A (out, r), B (in, r). Default init: balanced SVD split of nn.Linear's init."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        check_rank(rank, (out_features, in_features), "FactorizedLinear")
        self.in_features, self.out_features = in_features, out_features
        self._init_ab(out_features, in_features, rank, device, dtype)
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._ab_from_dense(dense.weight)
        self.bias = None if not bias else nn.Parameter(dense.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B.T), self.A, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> FactorizedLinear:
        """Best rank-``rank`` approximation of ``linear``, split as A = U sqrt(S), B = V sqrt(S)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        W = linear.weight
        check_rank(rank, tuple(W.shape), "FactorizedLinear.from_linear")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer._init_ab(W.shape[0], W.shape[1], rank, W.device, W.dtype)
        layer._ab_from_dense(W.detach())
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class FactorizedConv2d(_ABFactors):
    """Conv2d whose reshaped kernel (out, in*kh*kw) is A B^T; groups=1, zero padding only."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self._from_conv(conv, rank)

    def _from_conv(self, conv: nn.Conv2d, rank: int) -> None:
        reason = plain_conv_reason(conv, "FactorizedConv2d")
        if reason:
            raise ValueError(reason)
        W = conv.weight
        check_rank(rank, tuple(W.shape), "FactorizedConv2d")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(
            conv.kernel_size, conv.stride, conv.padding, conv.dilation
        )
        self._init_ab(W.shape[0], math.prod(W.shape[1:]), rank, W.device, W.dtype)
        self._ab_from_dense(W.detach())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, rank: int) -> FactorizedConv2d:
        """Best rank-``rank`` approximation of the reshaped kernel of ``conv``, balanced split."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv2d expects nn.Conv2d, got {type(conv).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._from_conv(conv, rank)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return factored_conv2d(
            x,
            self.A,
            self.B,
            self.in_channels,
            self.kernel_size,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )


def _is_target(m: nn.Module) -> bool:
    view = matrix_view(m)
    if view is None:
        return False
    return view.kind == "linear" or (
        view.kind == "conv2d" and plain_conv_reason(m, "FactorizedConv2d") is None
    )


def factorize_ab(model: nn.Module, rank: int | float, targets: Targets = None) -> nn.Module:
    """Replace nn.Linear / nn.Conv2d layers of ``model`` (in place) by A B^T factorizations.

    rank: an int (clamped to each layer's full rank) or a float in (0, 1): the fraction of each
    layer's weight parameters to keep, k = max(1, floor(p m n / (m + n))). targets: PEFT-style
    selection (see ``torchlowrank.targets``). Validates every layer before replacing any.
    Returns ``model``.
    """
    if (
        isinstance(rank, bool)
        or not isinstance(rank, (int, float))
        or rank <= 0
        or (isinstance(rank, float) and rank >= 1)
    ):
        raise ValueError(f"rank must be an int >= 1 or a float fraction in (0, 1), got {rank!r}")
    if is_sharded_module(model):
        raise ValueError(
            "factorize_ab replaces layers, which a model sharded by fully_shard (FSDP2) does not allow (the "
            "new layers would be unsharded, outside the sharding hooks): factorize_ab the unsharded model, "
            "then fully_shard it"
        )
    chosen = find_targets(model, targets, _is_target)
    plans = []
    for name, mod in chosen:
        m, n = mod.weight.shape[0], math.prod(mod.weight.shape[1:])
        k = min(rank, m, n) if isinstance(rank, int) else max(1, math.floor(rank * m * n / (m + n) + 1e-9))
        plans.append((name, mod, min(k, m, n)))
    for name, mod, k in plans:
        new = (
            FactorizedLinear.from_linear(mod, k)
            if matrix_view(mod).kind == "linear"
            else FactorizedConv2d.from_conv2d(mod, k)
        )
        replace_module(model, name, new)
    return model
