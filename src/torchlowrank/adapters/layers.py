"""Adapter wrappers: a frozen base layer plus a product of trainable factors (LoRA / Deep LoRA).

Every wrapper views its base weight as a matrix W0 (m, n) = (out, in-flat) -- nn.Linear as is,
HF Conv1D transposed, nn.Conv2d with the kernel flattened to (out, in*kh*kw), nn.Embedding
transposed to (dim, num_embeddings) -- and adds Delta W = scaling * W_L ... W_1 with
``lora_factors = [W_1 (r, n), W_2 .. W_{L-1} (r, r), W_L (m, r)]``. Depth 2 is LoRA
(``lora_A`` = W_1, ``lora_B`` = W_2). The forward never forms Delta W: the input goes through the
factors one by one (x W_1^T ... W_L^T), costing r (m + n) + (L - 2) r^2 per token.
``dense_weight()`` returns W0 + Delta W in the base layer's own layout, so ``tlr.spectrum`` and the
rank measures see the adapted weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import orthogonal_init, truncated_svd

__all__ = ["AdapterLayer", "LinearAdapter", "Conv1DAdapter", "Conv2dAdapter", "EmbeddingAdapter",
           "wrap_layer", "supported_layer", "is_hf_conv1d"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (GPT-2 style linear layer with weight (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def supported_layer(module: nn.Module) -> bool:
    """Layers that can carry an adapter: nn.Linear, HF Conv1D, nn.Conv2d (groups=1), nn.Embedding."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_hf_conv1d(module)


class AdapterLayer(nn.Module):
    """Base class: ``base_layer`` (frozen) + ``lora_factors`` (trainable), output base(x) + delta(x).

    Attributes: ``r``, ``depth``, ``scaling`` (alpha / r for LoRA, 1 for Deep LoRA), ``compressed``
    (True once :meth:`set_compressed` built the factors; then the outer factors train at gamma * lr),
    ``disabled`` (True: the adapter is bypassed, Delta W = 0).
    """

    def __init__(self, base_layer: nn.Module, r: int, depth: int = 2, scaling: float = 1.0,
                 dropout: float = 0.0, name: str = "layer") -> None:
        super().__init__()
        self.base_layer = base_layer
        m, n = self.matrix_shape()
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(m, n):
            raise ValueError(f"r={r!r} is too large for {name} ({type(base_layer).__name__} with weight matrix "
                             f"{m} x {n}): r must be in 1..{min(m, n)}; lower r or exclude this layer")
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        self.r, self.depth, self.scaling = r, depth, float(scaling)
        w = self.base_matrix()
        shapes = [(r, n)] + [(r, r)] * (depth - 2) + [(m, r)]
        self.lora_factors = nn.ParameterList(
            [nn.Parameter(torch.zeros(s, device=w.device, dtype=w.dtype)) for s in shapes])
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.compressed = False
        self.disabled = False
        self.init = "none"

    # -- the matrix view of the base weight -------------------------------------------------------
    def matrix_shape(self) -> tuple[int, int]:
        w = self.base_matrix()
        return int(w.shape[0]), int(w.shape[1])

    def base_matrix(self) -> torch.Tensor:
        """W0 as an (out, in-flat) matrix (a view of the base weight)."""
        return self.base_layer.weight

    def to_layout(self, M: torch.Tensor) -> torch.Tensor:
        """An (m, n) matrix in the base weight's own layout."""
        return M

    def from_layout(self, T: torch.Tensor) -> torch.Tensor:
        """A tensor in the base weight's layout (e.g. its gradient) as the (m, n) matrix view."""
        return T

    # -- factors -------------------------------------------------------------------------------
    @property
    def lora_A(self) -> nn.Parameter:
        """The first factor W_1 (r, n)."""
        return self.lora_factors[0]

    @property
    def lora_B(self) -> nn.Parameter:
        """The last factor W_L (m, r)."""
        return self.lora_factors[-1]

    def delta_matrix(self) -> torch.Tensor:
        """Delta W = scaling * W_L ... W_1, shape (m, n) (differentiable)."""
        out = self.lora_factors[-1]
        for W in reversed(list(self.lora_factors)[1:-1]):
            out = out @ W
        out = out @ self.lora_factors[0]
        return out * self.scaling if self.scaling != 1.0 else out

    def collapsed_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (m, r), A (r, n)) with B A = Delta W: B = scaling * W_L ... W_2, A = W_1 (detached)."""
        with torch.no_grad():
            B = self.lora_factors[-1]
            for W in reversed(list(self.lora_factors)[1:-1]):
                B = B @ W
            return (B * self.scaling).clone(), self.lora_factors[0].detach().clone()

    def delta_singular_values(self) -> torch.Tensor:
        """Singular values of Delta W (r,), from the factors: QR of B and A^T, SVD of R_B R_A^T (float64)."""
        B, A = self.collapsed_pair()
        _, RB = torch.linalg.qr(B.double())
        _, RA = torch.linalg.qr(A.double().T)
        return torch.linalg.svdvals(RB @ RA.T)

    def dense_weight(self) -> torch.Tensor:
        """W0 + Delta W in the base layer's weight layout (what the layer applies)."""
        if self.disabled:
            return self.base_layer.weight
        return self.base_layer.weight + self.to_layout(self.delta_matrix())

    # -- initialisations ---------------------------------------------------------------------------
    def reset_lora(self, init: str = "default") -> None:
        """LoRA init: ``"default"`` A Kaiming-uniform, B zero; ``"gaussian"`` A ~ N(0, 1/r^2), B zero;
        ``"pissa"`` A = sqrt(S/s) V^T, B = U sqrt(S/s) from the top-r SVD of W0, and W0 <- W0 - s B A."""
        A, B = self.lora_factors[0], self.lora_factors[-1]
        with torch.no_grad():
            for W in list(self.lora_factors)[1:-1]:
                W.copy_(torch.eye(self.r, dtype=W.dtype, device=W.device))
            if init == "default":
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                B.zero_()
            elif init == "gaussian":
                nn.init.normal_(A, std=1.0 / self.r)
                B.zero_()
            elif init == "pissa":
                W0 = self.base_matrix()
                U, S, Vh = truncated_svd(W0.detach(), self.r, method="full")
                root = torch.sqrt(S / self.scaling)
                A.copy_(root[:, None] * Vh)
                B.copy_(U * root[None, :])
                self.register_buffer("pissa_A0", A.detach().clone())
                self.register_buffer("pissa_B0", B.detach().clone())
                self._set_base_matrix(W0 - self.scaling * (B @ A))
            else:
                raise ValueError(f"unknown LoRA init {init!r}; use 'default', 'gaussian' or 'pissa'")
        self.init = init

    def reset_narrow(self, eps: float) -> None:
        """Narrow Deep LoRA: every factor orthogonal (orthonormal rows or columns) at scale eps."""
        with torch.no_grad():
            for W in self.lora_factors:
                W.copy_(orthogonal_init(W.shape[0], W.shape[1], eps, dtype=W.dtype, device=W.device))
        self.init = "narrow"
        self.compressed = False

    def set_compressed(self, left: torch.Tensor, right: torch.Tensor, eps: float) -> None:
        """Compressed Deep LoRA: W_1 = eps right^T, inner eps I_r, W_L = eps left (DESIGN §4.3).

        left: (m, r), right: (n, r); afterwards Delta W = eps^L left right^T.
        """
        m, n = self.matrix_shape()
        if tuple(left.shape) != (m, self.r) or tuple(right.shape) != (n, self.r):
            raise ValueError(f"left/right must be ({m}, {self.r}) and ({n}, {self.r}), got {tuple(left.shape)}, "
                             f"{tuple(right.shape)}")
        with torch.no_grad():
            first, last = self.lora_factors[0], self.lora_factors[-1]
            first.copy_(eps * right.T)
            for W in list(self.lora_factors)[1:-1]:
                W.copy_(eps * torch.eye(self.r, dtype=W.dtype, device=W.device))
            last.copy_(eps * left)
        self.init = "compressed"
        self.compressed = True

    def _set_base_matrix(self, M: torch.Tensor) -> None:
        with torch.no_grad():
            self.base_layer.weight.copy_(self.to_layout(M))

    # -- forward ------------------------------------------------------------------------------------
    def _first(self, x: torch.Tensor) -> torch.Tensor:
        """x -> x W_1^T (..., r) (layer-type specific)."""
        return F.linear(x, self.lora_factors[0])

    def _rest(self, h: torch.Tensor) -> torch.Tensor:
        """(..., r) -> (..., m) through W_2 .. W_L."""
        for W in list(self.lora_factors)[1:]:
            h = F.linear(h, W)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        h = self._first(self.lora_dropout(x) if self.lora_dropout is not None else x)
        if self.scaling != 1.0:
            h = h * self.scaling
        return out + self._rest(h)

    def merged_base(self) -> nn.Module:
        """The base layer with Delta W folded into its weight (PiSSA: W_res + Delta W)."""
        with torch.no_grad():
            self.base_layer.weight.add_(self.to_layout(self.delta_matrix()).to(self.base_layer.weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        m, n = self.matrix_shape()
        return f"matrix={m}x{n}, r={self.r}, depth={self.depth}, scaling={self.scaling:g}, init={self.init}"


class LinearAdapter(AdapterLayer):
    """Adapter on ``nn.Linear`` (weight (out, in)): y = base(x) + scaling * x W_1^T ... W_L^T."""


class _TransposedLayout:
    """For base layers that store the transpose of the (out, in) matrix they apply."""

    def base_matrix(self) -> torch.Tensor:
        return self.base_layer.weight.T

    def to_layout(self, M: torch.Tensor) -> torch.Tensor:
        return M.T

    def from_layout(self, T: torch.Tensor) -> torch.Tensor:
        return T.T


class Conv1DAdapter(_TransposedLayout, AdapterLayer):
    """Adapter on HF ``Conv1D`` (weight (in, out), y = x W + b); the matrix view is W^T."""


class Conv2dAdapter(AdapterLayer):
    """Adapter on ``nn.Conv2d``: W_1 is a conv with r filters (the base's kernel, stride, padding,
    dilation), the other factors are 1x1 convs; the matrix view is the kernel as (out, in*kh*kw)."""

    def base_matrix(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.reshape(w.shape[0], -1)

    def to_layout(self, M: torch.Tensor) -> torch.Tensor:
        return M.reshape(self.base_layer.weight.shape)

    def from_layout(self, T: torch.Tensor) -> torch.Tensor:
        return T.reshape(T.shape[0], -1)

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.base_layer
        kernel = self.lora_factors[0].reshape(self.r, *conv.weight.shape[1:])
        if conv.padding_mode != "zeros":
            return conv._conv_forward(x, kernel, None)
        return F.conv2d(x, kernel, None, conv.stride, conv.padding, conv.dilation)

    def _rest(self, h: torch.Tensor) -> torch.Tensor:
        h = h.movedim(1, -1)
        for W in list(self.lora_factors)[1:]:
            h = F.linear(h, W)
        return h.movedim(-1, 1)


class EmbeddingAdapter(_TransposedLayout, AdapterLayer):
    """Adapter on ``nn.Embedding`` (weight (num, dim)); the matrix view is the (dim, num) map from
    one-hot codes, so W_1 is (r, num) and W_1 applied to token ids is a lookup of its columns.
    ``init="default"`` follows PEFT for embeddings: first factor zero, last factor Gaussian."""

    def reset_lora(self, init: str = "default") -> None:
        if init == "default":
            with torch.no_grad():
                for W in list(self.lora_factors)[1:-1]:
                    W.copy_(torch.eye(self.r, dtype=W.dtype, device=W.device))
                self.lora_factors[0].zero_()
                nn.init.normal_(self.lora_factors[-1])
            self.init = init
        else:
            super().reset_lora(init)

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        e = self.base_layer
        return F.embedding(x, self.lora_factors[0].T, e.padding_idx, e.max_norm, e.norm_type,
                           e.scale_grad_by_freq, e.sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        h = self._first(x)  # no dropout on token ids
        if self.scaling != 1.0:
            h = h * self.scaling
        return out + self._rest(h)


def wrap_layer(module: nn.Module, r: int, depth: int, scaling: float, dropout: float, name: str) -> AdapterLayer:
    """The adapter wrapper for ``module`` (ValueError for an unsupported layer type)."""
    if isinstance(module, nn.Linear):
        cls = LinearAdapter
    elif is_hf_conv1d(module):
        cls = Conv1DAdapter
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"{name}: grouped convolutions (groups={module.groups}) cannot carry an adapter")
        cls = Conv2dAdapter
    elif isinstance(module, nn.Embedding):
        cls = EmbeddingAdapter
    else:
        raise ValueError(f"{name} is a {type(module).__name__}; adapters support nn.Linear, nn.Conv2d, "
                         "nn.Embedding and HF Conv1D")
    return cls(module, r, depth=depth, scaling=scaling, dropout=dropout, name=name)
