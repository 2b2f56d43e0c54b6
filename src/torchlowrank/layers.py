"""Factorized layers: the weight is stored as U diag(S) V^T and never formed in the forward pass.

``LowRankLinear``: W (out, in) = U (out, r) @ diag(S) (r,) @ V^T (r, in); forward
y = (x (V diag(S))) U^T + b costs r (in + out) multiply-adds per token instead of in * out.
``LowRankConv2d``: the kernel, reshaped to (out, in*kh*kw), is U diag(S) V^T; forward is a conv
with r output channels (the V factor) followed by a 1x1 conv (U diag(S)).
The U, S, V parametrisation is the one the geometric optimizers (DESIGN §4.5) update.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .linalg import truncated_svd

__all__ = ["LowRankLinear", "LowRankConv2d", "max_rank"]


def max_rank(shape: tuple[int, ...]) -> int:
    """Full rank of a weight: min(out, in * prod(kernel))."""
    return min(shape[0], math.prod(shape[1:]))


def _check_rank(rank: int, shape: tuple[int, ...], what: str) -> None:
    full = max_rank(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"rank for {what} with weight shape {tuple(shape)} must be an int in 1..{full}, got {rank!r}")


class _LowRankFactors(nn.Module):
    """Shared parameters and algebra of the factorized layers: U (m, r), S (r,), V (n, r)."""

    U: nn.Parameter
    S: nn.Parameter
    V: nn.Parameter

    def _init_factors(self, m: int, n: int, rank: int, device, dtype) -> None:
        self.rank = rank
        self.U = nn.Parameter(torch.empty(m, rank, device=device, dtype=dtype))
        self.S = nn.Parameter(torch.empty(rank, device=device, dtype=dtype))
        self.V = nn.Parameter(torch.empty(n, rank, device=device, dtype=dtype))

    def _reset_from_dense(self, dense: torch.Tensor, method: str = "auto") -> None:
        """Set U, S, V to the best rank-r approximation of ``dense`` (m, n) (conv kernels reshaped)."""
        U, S, Vh = truncated_svd(dense.reshape(dense.shape[0], -1), self.rank, method=method)
        with torch.no_grad():
            self.U.copy_(U)
            self.S.copy_(S)
            self.V.copy_(Vh.T)

    def _default_dense(self) -> nn.Module:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """The best rank-r approximation of the matching dense layer's default (Kaiming-uniform) init."""
        dense = self._default_dense()
        self._reset_from_dense(dense.weight)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(dense.bias)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix U diag(S) V^T this layer applies (differentiable)."""
        return (self.U * self.S) @ self.V.T

    @torch.no_grad()
    def set_factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        """Replace the factors with U (m, k), S (k,), V (n, k); the rank becomes k.

        Same rank: copied in place (the Parameter objects stay). New rank: new Parameters of the
        current dtype / device / requires_grad (a live autograd graph may still hold the old ones'
        gradient accumulators, so resizing them in place is unsafe); optimizers holding the old
        objects must swap them (LowRankSGD / LowRankAdam do).
        """
        k = S.shape[0]
        if U.shape != (self.U.shape[0], k) or V.shape != (self.V.shape[0], k) or S.ndim != 1:
            raise ValueError(f"set_factors expects U ({self.U.shape[0]}, k), S (k,), V ({self.V.shape[0]}, k); "
                             f"got {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}")
        if k == self.rank and self.U.shape[1] == k:
            self.U.copy_(U)
            self.S.copy_(S)
            self.V.copy_(V)
            return
        for name, new in (("U", U), ("S", S), ("V", V)):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(new.detach().to(device=old.device, dtype=old.dtype).clone(),
                                             requires_grad=old.requires_grad))
        self.rank = k


class LowRankLinear(_LowRankFactors):
    """A linear layer of rank ``rank``: y = x V diag(S) U^T + b.

    Shapes: x (..., in_features) -> y (..., out_features); U (out, r), S (r,), V (in, r).
    Default init: the best rank-r approximation of ``nn.Linear``'s default (Kaiming-uniform) weight,
    so a freshly built layer behaves like a truncated freshly built dense layer.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_rank(rank, (out_features, in_features), "LowRankLinear")
        self.in_features = in_features
        self.out_features = out_features
        self._init_factors(out_features, in_features, rank, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def _default_dense(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                         device=self.U.device, dtype=self.U.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # S is folded into the (in, r) factor: an (in x r) multiply instead of one over (tokens x r)
        h = F.linear(x, (self.V * self.S).T)  # (..., r)
        return F.linear(h, self.U, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight, formed on demand (for code that reads ``.weight``)."""
        return self.dense_weight()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, method: str = "auto") -> "LowRankLinear":
        """Best rank-``rank`` approximation of ``linear`` (Eckart-Young), same dtype and device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        W = linear.weight
        _check_rank(rank, tuple(W.shape), "from_linear")
        layer = cls.__new__(cls)
        _LowRankFactors.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer._init_factors(W.shape[0], W.shape[1], rank, W.device, W.dtype)
        layer._reset_from_dense(W.detach(), method)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        return layer

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with weight U diag(S) V^T (same dtype and device)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class LowRankConv2d(_LowRankFactors):
    """A 2-D convolution whose kernel, reshaped to (out, in*kh*kw), has rank ``rank``.

    Forward: conv with the r filters V^T reshaped to (r, in, kh, kw) (stride, padding, dilation of
    the original), scale by S, then a 1x1 conv with U (out, r) plus bias. Cost per output pixel:
    r (in*kh*kw + out) instead of out*in*kh*kw. Only ``groups=1`` and zero padding are supported.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        shape = (out_channels, in_channels, *self.kernel_size)
        _check_rank(rank, shape, "LowRankConv2d")
        self._init_factors(out_channels, in_channels * math.prod(self.kernel_size), rank, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def _conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def _default_dense(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
                         device=self.U.device, dtype=self.U.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.V.T.reshape(self.rank, self.in_channels, *self.kernel_size)
        h = F.conv2d(x, first, None, **self._conv_kwargs()) * self.S.view(1, -1, 1, 1)
        return F.conv2d(h, self.U.view(self.out_channels, self.rank, 1, 1), self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel (out, in, kh, kw), formed on demand."""
        return self.dense_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, rank: int, method: str = "auto") -> "LowRankConv2d":
        """Best rank-``rank`` approximation of the reshaped kernel of ``conv``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv2d expects nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"LowRankConv2d supports groups=1 and padding_mode='zeros'; got groups={conv.groups}, "
                             f"padding_mode={conv.padding_mode!r}")
        W = conv.weight
        _check_rank(rank, tuple(W.shape), "from_conv2d")
        layer = cls.__new__(cls)
        _LowRankFactors.__init__(layer)
        layer.in_channels, layer.out_channels = conv.in_channels, conv.out_channels
        layer.kernel_size, layer.stride, layer.dilation = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
        layer.padding = conv.padding
        layer._init_factors(W.shape[0], math.prod(W.shape[1:]), rank, W.device, W.dtype)
        layer._reset_from_dense(W.detach(), method)
        layer.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        return layer

    def to_conv2d(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
                         device=self.U.device, dtype=self.U.dtype, **self._conv_kwargs())
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")
