"""Which layers hold a weight matrix, how it is oriented, and how to read and write it: the one place
every feature (compress, ranks / spectrum, the spectrum tracker, regularizers, adapters, PEFT export,
the Hugging Face integration) asks.

:func:`matrix_view` gives a :class:`MatrixView` of a module: its ``kind``, the (out, in) ``shape`` of
the linear map y = W x it applies, and ``read()`` / ``write(W)`` of that matrix, plus the conversions
between the (out, in) matrix and the weight's stored layout. :func:`why_not_matrix` says why a module
has no (exact) matrix view, for error messages. Kinds:

- ``"linear"``: ``nn.Linear``, weight (out, in) as is;
- ``"hf_conv1d"``: Hugging Face's ``Conv1D`` (every GPT-2 attention and MLP projection), a linear layer
  whose weight is stored transposed, (in, out), with y = x W + b; recognised by duck typing so that
  nothing here imports ``transformers``;
- ``"conv2d"``: ``nn.Conv2d`` with ``groups=1``, kernel (out, in, kh, kw) viewed as (out, in*kh*kw),
  the matrix applied to each unfolded input patch (the padding mode changes the patches, not W);
- ``"conv1d"``: ``nn.Conv1d`` with ``groups=1``, kernel (out, in, k) viewed as (out, in*k);
- ``"embedding"``: ``nn.Embedding``, table (num, dim) stored transposed: the (dim, num) map from one-hot
  codes;
- ``"factorized"``: the library's ``LowRank*`` / ``Factorized*`` layers and anything else with a
  ``dense_weight()`` method; the matrix is computed from factors, so it can be read but not written;
- ``"adapted"``: an adapter wrapper (``dense_weight()`` and a ``base_layer``): W0 + Delta W, oriented as
  its base layer's view.

Any other convolution (``nn.Conv3d``, grouped, transposed) gets a *kernel* view,
``exact=False``: the kernel reshaped to (first dim, rest), which spectra list, but which is not the
one matrix the layer applies (``note`` says why). Teaching the library a new layer type is adding a
rule to :data:`DENSE_KINDS` here: spectra, the tracker and the regularizers then take it as it is.
What a feature must *build* for a kind stays with the feature, keyed by ``kind``: a factorized
replacement (``compress.REPLACEABLE``), an adapter wrapper (``adapters.layers.ADAPTER_CLASSES``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parameter import is_lazy

__all__ = [
    "MatrixView",
    "matrix_view",
    "why_not_matrix",
    "is_matrix_layer",
    "DENSE_KINDS",
    "MATRIX_LAYERS",
    "tied_aliases",
    "is_hf_conv1d",
    "is_meta",
    "check_not_meta",
    "parameter_holders",
    "shared_weight_holders",
    "max_rank",
    "check_rank",
    "pair",
    "plain_conv_reason",
]


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (GPT-2 style linear layer, weight (in, out), ``nf`` outputs)."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    )


def is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def check_not_meta(t: torch.Tensor, what: str) -> None:
    """``ValueError`` for a tensor on the ``meta`` device (it has a shape but no values to decompose)."""
    if is_meta(t):
        raise ValueError(
            f"{what} is on the 'meta' device: it has a shape but no values, so its singular values "
            "cannot be computed. Load the real weights first (e.g. model.to_empty(device='cpu') then "
            "load_state_dict, or from_pretrained without device_map='meta')."
        )


def max_rank(shape: tuple[int, ...]) -> int:
    """Full rank of a weight: min(out, in * prod(kernel))."""
    return min(shape[0], math.prod(shape[1:]))


def check_rank(rank: int, shape: tuple[int, ...], what: str) -> None:
    """``ValueError`` unless ``rank`` is an int in 1..max_rank(shape)."""
    full = max_rank(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(
            f"rank for {what} with weight shape {tuple(shape)} must be an int in 1..{full}, got {rank!r}"
        )


def pair(v) -> tuple[int, int]:
    """An int or a pair as a pair (conv hyper-parameters)."""
    return (v, v) if isinstance(v, int) else tuple(v)


def plain_conv_reason(conv: nn.Module, what: str) -> str | None:
    """Why ``what`` (a factorized conv layer) cannot stand for ``conv``: it supports ``groups=1`` and zero
    padding only. None if it can."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return (
            f"{what} supports groups=1 and padding_mode='zeros'; got groups={conv.groups}, "
            f"padding_mode={conv.padding_mode!r}"
        )
    return None


# -- the views --------------------------------------------------------------------------------------


def _identity(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return t


def _transpose(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return t.T


def _flatten(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _unflatten(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return t.reshape(module.weight.shape)


@dataclass(frozen=True)
class DenseKind:
    """How one family of layers stores its (out, in) matrix in ``module.weight``.

    ``matches(module)``: the family; ``from_layout(T, module)``: a tensor in the weight's layout (the
    weight, its gradient) -> the (out, in) matrix; ``to_layout(M, module)``: the inverse;
    ``transposed``: the stored layout is (in, out), so the output dimension is the weight's last.
    ``listed_as_stored``: spectra list the stored layout instead of the (out, in) matrix (conv kernels
    keep their (out, in, *k) shape; an embedding table (num, dim) is listed as stored, the orientation of
    the output head it is usually tied to)."""

    kind: str
    label: str  # for messages, e.g. "nn.Conv2d (groups=1)"
    matches: Callable[[nn.Module], bool]
    from_layout: Callable[[torch.Tensor, nn.Module], torch.Tensor]
    to_layout: Callable[[torch.Tensor, nn.Module], torch.Tensor]
    transposed: bool = False
    listed_as_stored: bool = False


def _plain_conv(cls: type[nn.Module]) -> Callable[[nn.Module], bool]:
    return lambda m: isinstance(m, cls) and m.groups == 1


# The layer types the library knows, first match wins. A new type is a new entry.
DENSE_KINDS: list[DenseKind] = [
    DenseKind("linear", "nn.Linear", lambda m: isinstance(m, nn.Linear), _identity, _identity),
    DenseKind("hf_conv1d", "HF Conv1D", is_hf_conv1d, _transpose, _transpose, transposed=True),
    DenseKind(
        "conv2d", "nn.Conv2d (groups=1)", _plain_conv(nn.Conv2d), _flatten, _unflatten, listed_as_stored=True
    ),
    DenseKind(
        "conv1d", "nn.Conv1d (groups=1)", _plain_conv(nn.Conv1d), _flatten, _unflatten, listed_as_stored=True
    ),
    DenseKind(
        "embedding",
        "nn.Embedding",
        lambda m: isinstance(m, nn.Embedding),
        _transpose,
        _transpose,
        transposed=True,
        listed_as_stored=True,
    ),
]

# for messages: the layer types above, and the computed kinds
MATRIX_LAYERS = ", ".join(k.label for k in DENSE_KINDS) + " and layers with dense_weight()"

# kernel views (exact=False): reshaped like a conv, listed in spectra, not one applied matrix
_KERNEL = DenseKind(
    "conv_kernel", "convolution kernel", lambda m: False, _flatten, _unflatten, listed_as_stored=True
)


def _has_dense_weight(module: nn.Module) -> bool:
    return callable(getattr(module, "dense_weight", None))


def _is_adapted(module: nn.Module) -> bool:
    return _has_dense_weight(module) and isinstance(getattr(module, "base_layer", None), nn.Module)


@dataclass(frozen=True)
class MatrixView:
    """The (out, in) matrix a layer applies, y = W x (conv: on each unfolded input patch).

    module: the layer; kind: see the module docstring; shape: (out, in) of W (conv kernels:
    (out, in * prod(kernel))); exact: False for a kernel view (grouped / transposed / untaught
    convolutions: the reshaped kernel is not the map applied), with ``note`` saying why.
    """

    module: nn.Module
    kind: str
    shape: tuple[int, int]
    exact: bool = True
    note: str = ""
    layout: DenseKind | None = field(default=None, repr=False)  # the stored weight's (adapted: its base's)

    # -- storage ---------------------------------------------------------------------------------
    @property
    def computed(self) -> bool:
        """True when W is computed from other parameters (factorized / adapted layers): no ``param``."""
        return self.kind in ("factorized", "adapted")

    @property
    def param(self) -> torch.Tensor | None:
        """The stored weight (``module.weight``), None for a computed matrix."""
        return None if self.computed else self.module.weight

    @property
    def transposed(self) -> bool:
        """True when the stored weight is (in, out) (HF Conv1D, nn.Embedding; adapters: their base's)."""
        return self.layout.transposed if self.layout is not None else False

    @property
    def out_dim(self) -> int:
        """The dimension of the stored weight that indexes outputs (0, or 1 for a transposed layout)."""
        return 1 if self.transposed else 0

    def from_layout(self, T: torch.Tensor) -> torch.Tensor:
        """A tensor in the stored weight's layout (the weight, its gradient) as the (out, in) matrix."""
        d = self.layout
        if d is None:
            return T.reshape(T.shape[0], -1)
        return d.from_layout(T, self._storage_module)

    def to_layout(self, M: torch.Tensor) -> torch.Tensor:
        """An (out, in) matrix in the stored weight's layout."""
        d = self.layout
        if d is None:
            raise TypeError(f"{type(self.module).__name__} stores no dense weight to lay a matrix out in")
        return d.to_layout(M, self._storage_module)

    @property
    def _storage_module(self) -> nn.Module:
        return self.module.base_layer if self.kind == "adapted" else self.module

    # -- the matrix ------------------------------------------------------------------------------
    def read(self) -> torch.Tensor:
        """W (out, in): a view of the stored weight where the layout allows (not detached, so
        differentiable; ``.detach()`` it to read values only)."""
        if self.kind == "factorized":
            W = self.module.dense_weight()
            return W.reshape(W.shape[0], -1)
        if self.kind == "adapted":
            return self.from_layout(self.module.dense_weight())
        return self.from_layout(self.module.weight)

    @torch.no_grad()
    def write(self, W: torch.Tensor) -> None:
        """Set the stored weight so that :meth:`read` gives ``W`` (out, in) (cast to its dtype, in
        place: the Parameter object stays). ``TypeError`` for a computed matrix."""
        if self.computed:
            raise TypeError(
                f"{type(self.module).__name__} computes its matrix from factors; it cannot be written "
                "as a dense matrix (set its factors instead)"
            )
        if tuple(W.shape) != self.shape:
            raise ValueError(f"expected a matrix of shape {self.shape}, got {tuple(W.shape)}")
        w = self.module.weight
        w.copy_(self.to_layout(W).to(w.dtype))

    def tensor(self) -> torch.Tensor:
        """The weight as spectra and the spectrum tracker list it: W (out, in), except that conv
        kernels keep their (out, in, *kernel) shape and an embedding table is listed as stored,
        (num, dim); a computed matrix as its ``dense_weight()`` gives it."""
        if self.computed:
            return self.module.dense_weight()
        return self.module.weight if self.layout.listed_as_stored else self.read()

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """Shape of :meth:`tensor` (without forming it for a dense layer)."""
        if self.computed:
            return tuple(self.tensor().shape)
        w = self.module.weight
        return tuple(w.shape) if self.layout.listed_as_stored else self.shape

    def tensor_grad(self) -> torch.Tensor | None:
        """The gradient of the stored weight, oriented as :meth:`tensor`; None when there is none
        (a computed matrix has no ``.grad`` of its own)."""
        if self.computed:
            return None
        g = self.module.weight.grad
        if g is None or self.layout.listed_as_stored:
            return g
        return self.from_layout(g)


def _shape_of(module: nn.Module, kind: DenseKind) -> tuple[int, int]:
    w = module.weight
    if kind.transposed:
        return int(w.shape[-1]), int(w.shape[0])
    return int(w.shape[0]), int(math.prod(w.shape[1:]))


def _computed_shape(module: nn.Module) -> tuple[int, int]:
    # from the hyper-parameters where the layer has them: forming W only to learn its shape is costly
    if isinstance(getattr(module, "out_features", None), int) and isinstance(
        getattr(module, "in_features", None), int
    ):
        return module.out_features, module.in_features
    if isinstance(getattr(module, "out_channels", None), int) and hasattr(module, "kernel_size"):
        return module.out_channels, module.in_channels * math.prod(module.kernel_size)
    with torch.no_grad():
        W = module.dense_weight()
    return int(W.shape[0]), int(math.prod(W.shape[1:]))


def matrix_view(module: nn.Module) -> MatrixView | None:
    """The :class:`MatrixView` of ``module``, or None if it holds no weight matrix (then
    :func:`why_not_matrix` says why). Kernel views (``exact=False``) are returned too."""
    if _is_adapted(module):
        base = matrix_view(module.base_layer)
        if base is not None:
            return MatrixView(module, "adapted", base.shape, base.exact, base.note, base.layout)
        return MatrixView(module, "factorized", _computed_shape(module))
    if _has_dense_weight(module):
        return MatrixView(module, "factorized", _computed_shape(module))
    if is_lazy(getattr(module, "weight", None)):
        return None  # no shape yet (nn.LazyLinear before its first forward)
    for kind in DENSE_KINDS:
        if kind.matches(module):
            return MatrixView(module, kind.kind, _shape_of(module, kind), layout=kind)
    if isinstance(module, nn.modules.conv._ConvNd):
        return MatrixView(
            module, _KERNEL.kind, _shape_of(module, _KERNEL), False, _kernel_note(module), _KERNEL
        )
    return None


def _kernel_note(conv: nn.Module) -> str:
    name = type(conv).__name__
    if conv.transposed:
        return (
            f"{name} is a transposed convolution: its kernel (in, out/groups, *kernel) is the adjoint "
            "of the map it applies"
        )
    if conv.groups != 1:
        return (
            f"{name} is a grouped convolution (groups={conv.groups}): its kernel is {conv.groups} "
            "separate matrices, not one (out, in*k) map"
        )
    return f"{name} is not a layer type the library knows as a matrix (known: {MATRIX_LAYERS})"


def why_not_matrix(module: nn.Module) -> str | None:
    """Why ``module`` has no exact matrix view (for error messages); None if it has one."""
    view = matrix_view(module)
    if view is not None:
        return None if view.exact else view.note
    w = getattr(module, "weight", None)
    if is_lazy(w):
        return f"{type(module).__name__}'s weight is not initialised yet (a lazy module): run a forward first"
    if isinstance(w, torch.Tensor):
        return (
            f"{type(module).__name__} has a weight of shape {tuple(w.shape)} but is not a matrix layer "
            f"(known: {MATRIX_LAYERS})"
        )
    return f"{type(module).__name__} has no weight matrix (known: {MATRIX_LAYERS})"


def is_matrix_layer(module: nn.Module) -> bool:
    """True if ``module`` has an exact :class:`MatrixView`."""
    view = matrix_view(module)
    return view is not None and view.exact


# -- tied weights -------------------------------------------------------------------------------------


def parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> every (full parameter name, owning module) that holds it (tied aliases included)."""
    index: dict[int, list[tuple[str, nn.Module]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            index.setdefault(id(p), []).append((f"{mod_name}.{p_name}" if mod_name else p_name, mod))
    return index


def shared_weight_holders(
    model: nn.Module, module: nn.Module, index: dict[int, list[tuple[str, nn.Module]]] | None = None
) -> list[str]:
    """Names of the other parameters of ``model`` that are the same tensor as ``module.weight``
    (e.g. ``["lm_head.weight"]`` for GPT-2's tied ``transformer.wte``). ``index``: a precomputed
    :func:`parameter_holders` (for many calls on one model)."""
    w = getattr(module, "weight", None)
    if w is None:
        return []
    index = parameter_holders(model) if index is None else index
    return sorted({name for name, mod in index.get(id(w), []) if mod is not module})


def tied_aliases(
    model: nn.Module, module: nn.Module, index: dict[int, list[tuple[str, nn.Module]]] | None = None
) -> list[str]:
    """The tied aliases of ``module``'s matrix in ``model``: the other parameter names holding its
    stored weight (:func:`shared_weight_holders`); none for a computed matrix (factorized / adapted
    layers apply a matrix of their own)."""
    view = matrix_view(module)
    if view is None or view.computed:
        return []
    return shared_weight_holders(model, module, index)
