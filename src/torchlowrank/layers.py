"""Factorized layers: the weight is stored as U diag(S) V^T and never formed in the forward pass.

``LowRankLinear``: W (out, in) = U (out, r) @ diag(S) (r,) @ V^T (r, in); forward
y = (x V) diag(S) U^T + b, with S folded into the smaller of V, U, costs r (in + out) multiply-adds
per token instead of in * out.
``LowRankConv2d``: the kernel, reshaped to (out, in*kh*kw), is U diag(S) V^T; forward is a conv
with r output channels (the V factor) followed by a 1x1 conv (U), S folded into the smaller factor.
The U, S, V parametrisation is the one the geometric optimizers (DESIGN §4.5) update.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layer_types import check_not_meta, check_rank, matrix_view, max_rank, pair, plain_conv_reason
from .linalg import orthogonal_init, truncated_svd

__all__ = [
    "LowRankLinear",
    "LowRankConv2d",
    "LowRankFactors",
    "conv_geometry",
    "factored_conv2d",
    "max_rank",
    "marchenko_pastur_top_singular_values",
]


def marchenko_pastur_top_singular_values(m: int, n: int, k: int, variance: float) -> torch.Tensor:
    """Typical top-``k`` singular values (float64, descending) of an (m, n) matrix with i.i.d. entries
    of the given variance, from the Marchenko-Pastur law.

    With N = max(m, n), q = min(m, n) / N, the eigenvalues x of X X^T / N (min side) follow MP on
    [v (1 - sqrt q)^2, v (1 + sqrt q)^2]; the i-th largest singular value is taken as sqrt(N x_i) at the
    upper-tail quantile (i - 1/2) / min(m, n). Accurate to a few percent for min(m, n) >= ~32.
    """
    N, small = max(m, n), min(m, n)
    q = small / N
    lo, hi = variance * (1 - q**0.5) ** 2, variance * (1 + q**0.5) ** 2
    # Chebyshev-spaced grid: the density has square-root edges (and a 1/sqrt(x) pole at 0 when q = 1)
    theta = torch.linspace(0.0, math.pi, 4097, dtype=torch.float64)
    x = lo + (hi - lo) * (1 - torch.cos(theta)) / 2
    dens = torch.sqrt(((hi - x) * (x - lo)).clamp_min(0)) / (2 * math.pi * variance * q * x.clamp_min(1e-300))
    cdf = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.cumsum((dens[1:] + dens[:-1]) / 2 * x.diff(), 0)]
    )
    cdf = cdf / cdf[-1]
    tail = 1 - (torch.arange(k, dtype=torch.float64) + 0.5) / small  # CDF level of the i-th largest
    j = torch.searchsorted(cdf, tail).clamp(1, len(x) - 1)
    w = (tail - cdf[j - 1]) / (cdf[j] - cdf[j - 1]).clamp_min(1e-300)
    eig = x[j - 1] + w * (x[j] - x[j - 1])
    return torch.sqrt(N * eig)


class LowRankFactors(nn.Module):
    """Shared parameters and algebra of the factorized layers: U (m, r), S (r,), V (n, r)."""

    U: nn.Parameter
    S: nn.Parameter
    V: nn.Parameter

    def _init_factors(self, m: int, n: int, rank: int, device, dtype) -> None:
        self.rank = rank
        self.U = nn.Parameter(torch.empty(m, rank, device=device, dtype=dtype))
        self.S = nn.Parameter(torch.empty(rank, device=device, dtype=dtype))
        self.V = nn.Parameter(torch.empty(n, rank, device=device, dtype=dtype))

    def _reset_from_dense(self, dense: torch.Tensor, method: str = "full") -> None:
        """Set U, S, V to the rank-r truncated SVD of ``dense`` (m, n) (conv kernels reshaped).
        ``method="full"`` gives the best rank-r approximation (Eckart-Young) to float precision."""
        check_not_meta(dense, "the weight to factorize")
        U, S, Vh = truncated_svd(dense.reshape(dense.shape[0], -1), self.rank, method=method)
        with torch.no_grad():
            self.U.copy_(U)
            self.S.copy_(S)
            self.V.copy_(Vh.T)

    def _fan_in(self) -> int:
        return self.V.shape[0]

    def reset_parameters(self) -> None:
        """Initialise without forming a dense matrix: U (m, r) and V (n, r) Haar-orthonormal, S the
        typical top-r singular values of the matching dense layer's default Kaiming-uniform init
        (entries U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1/(3 fan_in); Marchenko-Pastur law), and
        the bias as nn.Linear's. So W = U diag(S) V^T is distributed like the best rank-r approximation
        of a freshly built dense layer (its singular vectors are Haar too), at O((m + n) r^2) cost.
        On the ``meta`` device nothing is computed."""
        if self.U.device.type == "meta":
            return
        m, n, r = self.U.shape[0], self.V.shape[0], self.rank
        fan_in = self._fan_in()
        s = marchenko_pastur_top_singular_values(m, n, r, 1.0 / (3 * fan_in))
        # orthogonal_init draws from the global torch RNG, as nn.Linear's init does
        U = orthogonal_init(
            m, r, dtype=torch.float64
        )  # cast on copy: float64 layers stay orthonormal to 1e-16
        V = orthogonal_init(n, r, dtype=torch.float64)
        with torch.no_grad():
            self.U.copy_(U)
            self.S.copy_(s)
            self.V.copy_(V)
            if self.bias is not None:
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)

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
            raise ValueError(
                f"set_factors expects U ({self.U.shape[0]}, k), S (k,), V ({self.V.shape[0]}, k); "
                f"got {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}"
            )
        if k == self.rank and self.U.shape[1] == k:
            self.U.copy_(U)
            self.S.copy_(S)
            self.V.copy_(V)
            return
        for name, new in (("U", U), ("S", S), ("V", V)):
            old = getattr(self, name)
            setattr(
                self,
                name,
                nn.Parameter(
                    new.detach().to(device=old.device, dtype=old.dtype).clone(),
                    requires_grad=old.requires_grad,
                ),
            )
        self.rank = k


class LowRankLinear(LowRankFactors):
    """A linear layer of rank ``rank``: y = x V diag(S) U^T + b.

    Shapes: x (..., in_features) -> y (..., out_features); U (out, r), S (r,), V (in, r).
    Default init (:meth:`reset_parameters`): distributed like the best rank-r approximation of
    ``nn.Linear``'s default Kaiming-uniform weight, built directly from the factors (no dense
    matrix, no SVD; works on ``device="meta"``).
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        check_rank(rank, (out_features, in_features), "LowRankLinear")
        self.in_features = in_features
        self.out_features = out_features
        self._init_factors(out_features, in_features, rank, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # S scales the smallest of the three operands it could: the (tokens, r) activations (small
        # batches) or the smaller factor (r * min(in, out) multiplies, not tokens * r). Both right
        # operands stay contiguous:
        # x @ (in, r), h @ (out, r)^T, so every weight gradient comes out of its GEMM in the
        # parameter's own layout (no transposed gradient to re-lay in AccumulateGrad).
        tokens = x.numel() // self.in_features
        if tokens <= min(self.in_features, self.out_features):
            return F.linear((x @ self.V) * self.S, self.U, self.bias)
        if self.in_features <= self.out_features:
            return F.linear(x @ (self.V * self.S), self.U, self.bias)
        return F.linear(x @ self.V, self.U * self.S, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight, formed on demand (for code that reads ``.weight``)."""
        return self.dense_weight()

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, method: str = "full") -> LowRankLinear:
        """Best rank-``rank`` approximation of ``linear`` (Eckart-Young), same dtype and device.

        linear: ``nn.Linear`` (weight (out, in)) or Hugging Face ``Conv1D`` (weight (in, out), the
        matrix applied is its transpose). ``method="full"`` (default) is exact to float precision;
        ``"randomized"`` is faster on big layers but only near-optimal (numbers in docs/layers.md).
        Built through ``cls.__init__``, so subclasses get their own construction.
        """
        view = matrix_view(linear)
        if view is None or view.kind not in ("linear", "hf_conv1d"):
            raise TypeError(
                f"from_linear expects nn.Linear or Hugging Face Conv1D, got {type(linear).__name__}"
            )
        W, (n_out, n_in) = view.read(), view.shape
        check_rank(rank, tuple(W.shape), "from_linear")
        check_not_meta(W, f"the weight of {type(linear).__name__}")
        layer = cls(n_in, n_out, rank, bias=linear.bias is not None, device=W.device, dtype=W.dtype)
        layer._reset_from_dense(W.detach(), method)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with weight U diag(S) V^T (same dtype and device)."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.U.device,
            dtype=self.U.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def conv_geometry(kernel_size, stride, padding, dilation) -> tuple:
    """(kernel_size, stride, padding, dilation) of a 2-D convolution as pairs (a string padding such as
    ``"same"`` stays a string): the hyper-parameters the factorized conv layers keep."""
    return (
        pair(kernel_size),
        pair(stride),
        padding if isinstance(padding, str) else pair(padding),
        pair(dilation),
    )


def factored_conv2d(
    x: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    in_channels: int,
    kernel_size: tuple[int, int],
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
) -> torch.Tensor:
    """conv2d of x (batch, in, h, w) with the kernel whose (out, in*kh*kw) matrix is left (out, r) @
    right (in*kh*kw, r)^T, never formed: a conv with the r filters right^T reshaped to (r, in, kh, kw),
    then a 1x1 conv with left. Cost per output pixel r (in*kh*kw + out) instead of out*in*kh*kw."""
    r = right.shape[1]
    first = right.T.reshape(r, in_channels, *kernel_size)
    h = F.conv2d(x, first, None, stride=stride, padding=padding, dilation=dilation)
    return F.conv2d(h, left.reshape(left.shape[0], r, 1, 1), bias)


class LowRankConv2d(LowRankFactors):
    """A 2-D convolution whose kernel, reshaped to (out, in*kh*kw), has rank ``rank``.

    Forward: conv with the r filters V^T reshaped to (r, in, kh, kw) (stride, padding, dilation of
    the original), then a 1x1 conv with U (out, r) plus bias; S scales the smaller of V, U. Cost per output pixel:
    r (in*kh*kw + out) instead of out*in*kh*kw. Only ``groups=1`` and zero padding are supported.
    """

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
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(
            kernel_size, stride, padding, dilation
        )
        shape = (out_channels, in_channels, *self.kernel_size)
        check_rank(rank, shape, "LowRankConv2d")
        self._init_factors(out_channels, in_channels * math.prod(self.kernel_size), rank, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def _conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # S scales the smaller factor, not the (batch, r, h, w) activation (and no reduction over
        # batch and pixels in the backward)
        V, U = self.V, self.U
        if V.shape[0] <= U.shape[0]:
            V = V * self.S
        else:
            U = U * self.S
        return factored_conv2d(x, U, V, self.in_channels, self.kernel_size, self.bias, **self._conv_kwargs())

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel (out, in, kh, kw), formed on demand."""
        return self.dense_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, rank: int, method: str = "full") -> LowRankConv2d:
        """Best rank-``rank`` approximation of the reshaped kernel of ``conv`` (exact with ``method="full"``)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv2d expects nn.Conv2d, got {type(conv).__name__}")
        reason = plain_conv_reason(conv, "LowRankConv2d")
        if reason:
            raise ValueError(reason)
        W = conv.weight
        check_rank(rank, tuple(W.shape), "from_conv2d")
        check_not_meta(W, "the kernel of Conv2d")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            rank,
            stride=tuple(conv.stride),
            padding=conv.padding,
            dilation=tuple(conv.dilation),
            bias=conv.bias is not None,
            device=W.device,
            dtype=W.dtype,
        )
        layer._reset_from_dense(W.detach(), method)
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer

    def to_conv2d(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            bias=self.bias is not None,
            device=self.U.device,
            dtype=self.U.dtype,
            **self._conv_kwargs(),
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )
