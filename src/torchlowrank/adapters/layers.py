"""Adapter wrappers: a frozen base layer plus a product of trainable factors (LoRA / Deep LoRA).

Every wrapper views its base weight as a matrix W0 (m, n) = (out, in-flat) -- nn.Linear as is,
HF Conv1D transposed, nn.Conv2d with the kernel flattened to (out, in*kh*kw), nn.Embedding
transposed to (dim, num_embeddings) -- and adds Delta W = scaling * W_L ... W_1 with
``lora_factors = [W_1 (r, n), W_2 .. W_{L-1} (r, r), W_L (m, r)]``. Depth 2 is LoRA
(``lora_A`` = W_1, ``lora_B`` = W_2). The forward never forms Delta W: the input goes through the
factors one by one (x W_1^T ... W_L^T), costing r (m + n) + (L - 2) r^2 per token.
``dense_weight()`` returns W0 + Delta W in the base layer's own layout, so ``tlr.spectrum`` and the
rank measures see the adapted weight. ``weight`` / ``bias`` are the base layer's (as in PEFT), and so
are its hyper-parameters (``stride``, ``kernel_size``, ``in_features``, ``num_embeddings``, ...), so code
that reads ``layer.weight`` (Hugging Face's embedding helpers) keeps working; the out_proj of an
``nn.MultiheadAttention`` (whose forward reads ``out_proj.weight`` instead of calling it) sees W0 + Delta W.

Half precision: with ``factor_dtype=torch.float32`` on a float16 / bfloat16 base (the configs'
``autocast_adapter_dtype=True``, PEFT's default) the factors live in float32, the adapter path runs
in float32 and its output is cast to the base output's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_types import is_hf_conv1d, matrix_view
from ..linalg import orthogonal_init, truncated_svd

__all__ = [
    "AdapterLayer",
    "LinearAdapter",
    "Conv1DAdapter",
    "Conv2dAdapter",
    "EmbeddingAdapter",
    "wrap_layer",
    "supported_layer",
    "unsupported_reason",
    "is_hf_conv1d",
    "adapter_dtype",
    "SUPPORTED",
]

SUPPORTED = "nn.Linear, HF Conv1D, nn.Conv2d (groups=1) and nn.Embedding"
HALF = (torch.float16, torch.bfloat16)
# read through an adapter from its base layer (as for nn.Linear / nn.Conv2d / nn.Embedding / HF Conv1D)
BASE_ATTRIBUTES = frozenset(
    {
        "in_features",
        "out_features",
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "output_padding",
        "transposed",
        "num_embeddings",
        "embedding_dim",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
        "nf",
        "nx",
    }
)


def _grouped(module: nn.Module) -> bool:
    view = matrix_view(module)
    return view is not None and not view.exact and getattr(module, "groups", 1) != 1


def unsupported_reason(module: nn.Module) -> str | None:
    """None if ``module`` can carry an adapter, else why not (for error messages)."""
    if isinstance(module, AdapterLayer):
        return "it already is an adapter"
    if _grouped(module):
        return f"grouped convolutions (groups={module.groups}) are not supported"
    view = matrix_view(module)
    if view is not None and view.kind in ADAPTER_CLASSES:
        return None
    return f"{type(module).__name__} is not a supported layer type (adapters support {SUPPORTED})"


def supported_layer(module: nn.Module) -> bool:
    """Layers that can carry an adapter: nn.Linear, HF Conv1D, nn.Conv2d (groups=1), nn.Embedding."""
    return unsupported_reason(module) is None


def adapter_dtype(weight: torch.Tensor, autocast: bool = True) -> torch.dtype:
    """The factors' dtype for a base weight: float32 for a float16 / bfloat16 base when ``autocast``,
    else the base's own dtype (float32 / float64 stay as they are)."""
    return torch.float32 if autocast and weight.dtype in HALF else weight.dtype


class AdapterLayer(nn.Module):
    """Base class: ``base_layer`` (frozen) + ``lora_factors`` (trainable), output base(x) + delta(x).

    Attributes: ``r``, ``depth``, ``scaling`` (alpha / r for LoRA, 1 for Deep LoRA), ``compressed``
    (True once :meth:`set_compressed` built the factors; then the outer factors train at gamma * lr),
    ``disabled`` (True: the adapter is bypassed, Delta W = 0).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        depth: int = 2,
        scaling: float = 1.0,
        dropout: float = 0.0,
        name: str = "layer",
        factor_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        m, n = self.matrix_shape()
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(m, n):
            raise ValueError(
                f"r={r!r} is too large for {name} ({type(base_layer).__name__} with weight matrix "
                f"{m} x {n}): r must be in 1..{min(m, n)}; lower r or exclude this layer"
            )
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        self.r, self.depth, self.scaling = r, depth, float(scaling)
        w = self.base_matrix()
        shapes = [(r, n)] + [(r, r)] * (depth - 2) + [(m, r)]
        dtype = w.dtype if factor_dtype is None else factor_dtype
        self.lora_factors = nn.ParameterList(
            [nn.Parameter(torch.zeros(s, device=w.device, dtype=dtype)) for s in shapes]
        )
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.compressed = False
        self.disabled = False
        self.init = "none"
        # True for the out_proj of an nn.MultiheadAttention: its forward reads out_proj.weight
        self.weight_is_dense = False

    # -- what code written for the base layer reads ----------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (PEFT's behaviour); W0 + Delta W when ``weight_is_dense``."""
        return self.dense_weight() if self.weight_is_dense else self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None if it has none)."""
        return getattr(self.base_layer, "bias", None)

    def __getattr__(self, name: str):
        # the base layer's hyper-parameters, which model code reads from the layer it called (MobileNetV2's
        # TF padding reads the first convolution's stride and kernel_size)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in BASE_ATTRIBUTES and "base_layer" in self.__dict__.get("_modules", {}):
                return getattr(self._modules["base_layer"], name)
            raise

    def __setattr__(self, name: str, value) -> None:
        # ``layer.weight = p`` (Hugging Face's tie_weights on an adapted head) sets the base layer's weight
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            setattr(self.base_layer, name, value)
        else:
            super().__setattr__(name, value)

    # -- the matrix view of the base weight (torchlowrank.layer_types) -----------------------------
    def matrix_shape(self) -> tuple[int, int]:
        """(m, n) = (out, in-flat) of the base weight's matrix view."""
        return matrix_view(self.base_layer).shape

    def base_matrix(self) -> torch.Tensor:
        """W0 as an (out, in-flat) matrix (a view of the base weight)."""
        return matrix_view(self.base_layer).read()

    def to_layout(self, M: torch.Tensor) -> torch.Tensor:
        """An (m, n) matrix in the base weight's own layout."""
        return matrix_view(self.base_layer).to_layout(M)

    def from_layout(self, T: torch.Tensor) -> torch.Tensor:
        """A tensor in the base weight's layout (e.g. its gradient) as the (m, n) matrix view."""
        return matrix_view(self.base_layer).from_layout(T)

    # -- factors -------------------------------------------------------------------------------
    def named_factors(self) -> list[tuple[str, nn.Parameter]]:
        """(state-dict suffix, tensor) of every trainable factor, as an adapter file stores them."""
        return [(f"lora_factors.{i}", p) for i, p in enumerate(self.lora_factors)]

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
        """W0 + Delta W in the base layer's weight layout and dtype (what the layer applies;
        differentiable in the factors). The sum is formed in the wider of the two dtypes."""
        w = self.base_layer.weight
        if self.disabled:
            return w
        delta = self.to_layout(self.delta_matrix())
        wide = torch.promote_types(w.dtype, delta.dtype)
        return (w.to(wide) + delta.to(wide)).to(w.dtype)

    # -- initialisations ---------------------------------------------------------------------------
    def reset_lora(self, init: str = "default") -> None:
        """LoRA init: ``"default"`` A Kaiming-uniform, B zero; ``"gaussian"`` A ~ N(0, 1/r^2), B zero;
        ``"pissa"`` A = sqrt(S/s) V^T, B = U sqrt(S/s) from the top-r SVD of W0, and W0 <- W0 - s B A."""
        residual = self.init_lora_factors(init)
        if residual is not None:
            self._set_base_matrix(residual)

    def check_pissa(self, name: str = "layer") -> None:
        """ValueError (naming ``name``) if PiSSA cannot start from this base weight: on the meta device
        or with NaN / inf entries."""
        w = self.base_layer.weight
        if w.is_meta:
            raise ValueError(
                f"{name}: init='pissa' needs the real weights (an SVD of W0) but the model is on the "
                "meta device; load the weights first (e.g. model.to_empty(...) + load_state_dict) or "
                "use init='default'"
            )
        if not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"{name}: its weight holds NaN or inf values, so PiSSA (an SVD of W0) cannot start "
                "from it; fix or reload the weights, or exclude this layer"
            )

    def init_lora_factors(self, init: str = "default") -> torch.Tensor | None:
        """Set the factors for a LoRA init without touching the base layer; for PiSSA returns the
        residual matrix W0 - s B A (m, n) that :meth:`reset_lora` writes into the base weight."""
        A, B = self.lora_factors[0], self.lora_factors[-1]
        residual = None
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
                self.check_pissa()
                W0 = self.base_matrix().detach()
                wide = torch.promote_types(W0.dtype, A.dtype)
                U, S, Vh = truncated_svd(W0.to(wide), self.r, method="full")
                root = torch.sqrt(S / self.scaling)
                A.copy_(root[:, None] * Vh)
                B.copy_(U * root[None, :])
                self.register_buffer("pissa_A0", A.detach().clone())
                self.register_buffer("pissa_B0", B.detach().clone())
                residual = W0.to(wide) - self.scaling * (B.to(wide) @ A.to(wide))
            else:
                raise ValueError(f"unknown LoRA init {init!r}; use 'default', 'gaussian' or 'pissa'")
        self.init = init
        return residual

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
            raise ValueError(
                f"left/right must be ({m}, {self.r}) and ({n}, {self.r}), got {tuple(left.shape)}, "
                f"{tuple(right.shape)}"
            )
        with torch.no_grad():
            first, last = self.lora_factors[0], self.lora_factors[-1]
            first.copy_(eps * right.T)
            for W in list(self.lora_factors)[1:-1]:
                W.copy_(eps * torch.eye(self.r, dtype=W.dtype, device=W.device))
            last.copy_(eps * left)
        self.init = "compressed"
        self.compressed = True

    def _set_base_matrix(self, M: torch.Tensor) -> None:
        matrix_view(self.base_layer).write(M)

    # -- forward ------------------------------------------------------------------------------------
    def _first(self, x: torch.Tensor) -> torch.Tensor:
        """x -> x W_1^T (..., r) (layer-type specific)."""
        return F.linear(x, self.lora_factors[0])

    def _rest(self, h: torch.Tensor) -> torch.Tensor:
        """(..., r) -> (..., m) through W_2 .. W_L."""
        for W in list(self.lora_factors)[1:]:
            h = F.linear(h, W)
        return h

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_factors[0].dtype
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        x = self._adapter_input(x)
        h = self._first(self.lora_dropout(x) if self.lora_dropout is not None else x)
        if self.scaling != 1.0:
            h = h * self.scaling
        return out + self._rest(h).to(out.dtype)

    def merged_base(self) -> nn.Module:
        """The base layer with Delta W folded into its weight (PiSSA: W_res + Delta W); the sum is
        formed in the wider dtype of W0 and the factors, then stored in W0's dtype."""
        w = self.base_layer.weight
        with torch.no_grad():
            delta = self.to_layout(self.delta_matrix())
            wide = torch.promote_types(w.dtype, delta.dtype)
            w.copy_((w.to(wide) + delta.to(wide)).to(w.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        m, n = self.matrix_shape()
        return f"matrix={m}x{n}, r={self.r}, depth={self.depth}, scaling={self.scaling:g}, init={self.init}"


class LinearAdapter(AdapterLayer):
    """Adapter on ``nn.Linear`` (weight (out, in)): y = base(x) + scaling * x W_1^T ... W_L^T."""


class Conv1DAdapter(AdapterLayer):
    """Adapter on HF ``Conv1D`` (weight (in, out), y = x W + b); the matrix view is W^T."""


class Conv2dAdapter(AdapterLayer):
    """Adapter on ``nn.Conv2d``: W_1 is a conv with r filters (the base's kernel, stride, padding,
    dilation), the other factors are 1x1 convs; the matrix view is the kernel as (out, in*kh*kw)."""

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.base_layer
        kernel = self.lora_factors[0].reshape(self.r, *conv.weight.shape[1:])
        if conv.padding_mode != "zeros":  # _conv_forward pads as the base does (reflect, replicate, circular)
            return conv._conv_forward(x, kernel, None)
        return F.conv2d(x, kernel, None, conv.stride, conv.padding, conv.dilation)

    def _rest(self, h: torch.Tensor) -> torch.Tensor:
        h = h.movedim(1, -1)
        for W in list(self.lora_factors)[1:]:
            h = F.linear(h, W)
        return h.movedim(-1, 1)


class EmbeddingAdapter(AdapterLayer):
    """Adapter on ``nn.Embedding`` (weight (num, dim)); the matrix view is the (dim, num) map from
    one-hot codes, so W_1 is (r, num) and W_1 applied to token ids is a lookup of its columns.
    ``init="default"`` follows PEFT for embeddings: first factor zero, last factor Gaussian.
    The adapter's lookup is dense even for ``nn.Embedding(sparse=True)`` (the factor W_1 is small,
    and the frozen base table gets no gradient either way)."""

    def init_lora_factors(self, init: str = "default") -> torch.Tensor | None:
        if init != "default":
            return super().init_lora_factors(init)
        with torch.no_grad():
            for W in list(self.lora_factors)[1:-1]:
                W.copy_(torch.eye(self.r, dtype=W.dtype, device=W.device))
            self.lora_factors[0].zero_()
            nn.init.normal_(self.lora_factors[-1])
        self.init = init
        return None

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        e = self.base_layer
        return F.embedding(
            x, self.lora_factors[0].T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        h = self._first(x)  # no dropout on token ids
        if self.scaling != 1.0:
            h = h * self.scaling
        return out + self._rest(h).to(out.dtype)


def wrap_layer(
    module: nn.Module,
    r: int,
    depth: int,
    scaling: float,
    dropout: float,
    name: str,
    autocast_adapter_dtype: bool = True,
) -> AdapterLayer:
    """The adapter wrapper for ``module`` (ValueError for an unsupported layer type); the factors are
    float32 on a half-precision base when ``autocast_adapter_dtype``."""
    if isinstance(module, AdapterLayer):
        raise ValueError(f"{name} already is an adapter; merge it first")
    if _grouped(module):
        raise ValueError(f"{name}: grouped convolutions (groups={module.groups}) cannot carry an adapter")
    view = matrix_view(module)
    cls = ADAPTER_CLASSES.get(view.kind) if view is not None else None
    if cls is None:
        raise ValueError(
            f"{name} is a {type(module).__name__}; adapters support nn.Linear, nn.Conv2d, "
            "nn.Embedding and HF Conv1D"
        )
    return cls(
        module,
        r,
        depth=depth,
        scaling=scaling,
        dropout=dropout,
        name=name,
        factor_dtype=adapter_dtype(module.weight, autocast_adapter_dtype),
    )


# the adapter wrapper of each kind of matrix view (torchlowrank.layer_types) that has one
ADAPTER_CLASSES: dict[str, type[AdapterLayer]] = {
    "linear": LinearAdapter,
    "hf_conv1d": Conv1DAdapter,
    "conv2d": Conv2dAdapter,
    "embedding": EmbeddingAdapter,
}
