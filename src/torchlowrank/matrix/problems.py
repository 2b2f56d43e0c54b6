"""Recovery problems: losses ``f(Phi)`` with hand-written gradients, in float64.

Loss convention (all problems): ``f(Phi) = c/2 * ||residual||^2`` with ``c = 1`` for
``reduction="sum"`` and ``c = 1 / (number of residual entries)`` for ``reduction="mean"`` (the
default): observed entries for completion, measurements for sensing, m*n for plain factorization.
Gradient descent step sizes depend on this choice: a mean-reduced step is the sum-reduced step
times the number of residual entries.

Every problem offers ``loss_and_grad(Phi)`` -> (loss, df/dPhi (m, n)) and
``factored_loss_and_grads(X, Bt)`` for ``Phi = X @ Bt.T`` -> (loss, df/dX (m, k), df/dBt (n, k));
completion implements the latter on the observed entries only (never forming an (m, n) matrix).
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = [
    "Problem",
    "Completion",
    "Sensing",
    "Factorization",
    "low_rank_target",
    "random_mask",
    "relative_error",
]


def relative_error(X: torch.Tensor, M: torch.Tensor) -> float:
    """``||X - M||_F / ||M||_F``."""
    return float(torch.linalg.matrix_norm(X - M) / torch.linalg.matrix_norm(M))


def low_rank_target(
    shape: tuple[int, int],
    rank: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``U V^T / (m n)^(1/4)`` with U (m, r), V (n, r) i.i.d. N(0, 1): rank r, singular values
    about ``(m n)^(1/4)`` (sqrt(d) for a square d x d target)."""
    m, n = shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in 1..{min(m, n)} for shape {shape}, got {rank}")
    dev = "cpu" if generator is None else generator.device
    U = torch.randn(m, rank, generator=generator, dtype=torch.float64, device=dev)
    V = torch.randn(n, rank, generator=generator, dtype=torch.float64, device=dev)
    return ((U @ V.T) / (m * n) ** 0.25).to(dtype)


def random_mask(
    shape: tuple[int, int], fraction: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Boolean (m, n) mask with each entry observed independently with probability ``fraction``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    dev = "cpu" if generator is None else generator.device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=dev) < fraction


def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction


class Problem:
    """Base class: subclasses set ``shape``, ``scale`` (c above) and implement ``loss_and_grad``.

    The interface :func:`~torchlowrank.matrix.train_gd` relies on (instead of probing attributes):
    ``loss_and_grad`` / ``factored_loss_and_grads``, ``zero_loss()`` (the loss at Phi = 0, the
    scale of the relative residual), ``recovery_error``, ``truth`` (or None), ``test`` (held-out
    ``(rows, cols, values)`` or None), ``unit`` (the factor that turns RMSEs into the data's units),
    and for problems that fit terms beside the network (the biases of :func:`complete`):
    ``trained_state()`` (None when there are none), ``load_trained_state(state)`` and
    ``entry_offsets(rows, cols)`` (None when there are none)."""

    shape: tuple[int, int]
    scale: float
    reduction: str
    truth: torch.Tensor | None = None
    test: tuple | None = None
    unit: float = 1.0

    def zero_loss(self) -> float:
        """The loss at ``Phi = 0``."""
        dev = self.truth.device if self.truth is not None else None
        return float(self.loss_and_grad(torch.zeros(self.shape, dtype=torch.float64, device=dev))[0])

    def trained_state(self):
        """Terms the problem fits beside the network (None: there are none)."""
        return None

    def load_trained_state(self, state) -> None:
        """Restore what :meth:`trained_state` returned."""

    def entry_offsets(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """Offsets the problem adds to the network's entries (None: there are none)."""
        return None

    def loss_and_grad(self, Phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, Phi: torch.Tensor) -> torch.Tensor:
        """The loss (differentiable by autograd: used by the tests as the reference)."""
        raise NotImplementedError

    def factored_loss_and_grads(
        self, X: torch.Tensor, Bt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss and gradients for ``Phi = X @ Bt.T``: X (m, k), Bt (n, k) -> (loss, dX, dBt)."""
        loss, G = self.loss_and_grad(X @ Bt.T)
        return loss, G @ Bt, G.T @ X

    def recovery_error(self, Phi: torch.Tensor) -> float | None:
        """``||Phi - M||_F / ||M||_F`` over all entries when the truth M is known, else None."""
        return None if self.truth is None else relative_error(Phi, self.truth)


class Factorization(Problem):
    """Plain factorization of a fully observed target: ``f = c/2 ||Phi - M||_F^2``, c = 1/(m n) or 1."""

    def __init__(self, target: torch.Tensor, reduction: str = "mean") -> None:
        if not isinstance(target, torch.Tensor) or target.ndim != 2:
            raise ValueError("target must be a 2-D tensor")
        if not torch.isfinite(target).all():
            raise ValueError("target contains NaN/Inf; clean the data (or use Completion with a mask)")
        self.target = target.to(torch.float64)
        self.truth = self.target
        self.shape = tuple(target.shape)
        self.reduction = _check_reduction(reduction)
        self.scale = 1.0 / target.numel() if reduction == "mean" else 1.0

    def zero_loss(self) -> float:
        return float(0.5 * self.scale * self.target.square().sum())

    def loss(self, Phi):
        return 0.5 * self.scale * (Phi - self.target).square().sum()

    def loss_and_grad(self, Phi):
        R = Phi - self.target
        return 0.5 * self.scale * R.square().sum(), self.scale * R


class Sensing(Problem):
    """Matrix sensing ``y_k = <A_k, M>``: ``f = c/2 sum_k (<A_k, Phi> - y_k)^2``, c = 1/p or 1.

    operators: (p, m, n) measurement matrices; measurements: (p,); truth: optional (m, n).
    """

    def __init__(
        self,
        operators: torch.Tensor,
        measurements: torch.Tensor,
        reduction: str = "mean",
        truth: torch.Tensor | None = None,
    ) -> None:
        if operators.ndim != 3:
            raise ValueError(f"operators must have shape (p, m, n), got {tuple(operators.shape)}")
        if measurements.shape != operators.shape[:1]:
            raise ValueError(
                f"measurements must have shape ({operators.shape[0]},) to match the "
                f"operators, got {tuple(measurements.shape)}"
            )
        if not (torch.isfinite(operators).all() and torch.isfinite(measurements).all()):
            raise ValueError("operators / measurements contain NaN/Inf; drop those measurements")
        p = operators.shape[0]
        self.A = operators.to(torch.float64).reshape(p, -1)
        self.y = measurements.to(torch.float64)
        self.shape = tuple(operators.shape[1:])
        self.reduction = _check_reduction(reduction)
        self.scale = 1.0 / p if reduction == "mean" else 1.0
        self.truth = None if truth is None else truth.to(torch.float64)

    @classmethod
    def gaussian(
        cls,
        truth: torch.Tensor,
        n_measurements: int,
        *,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> Sensing:
        """Gaussian operators with i.i.d. N(0, 1/p) entries applied to ``truth``."""
        m, n = truth.shape
        dev = "cpu" if generator is None else generator.device
        A = torch.randn(n_measurements, m, n, generator=generator, dtype=torch.float64, device=dev)
        A = A.to(truth.device) / math.sqrt(n_measurements)
        y = A.reshape(n_measurements, -1) @ truth.reshape(-1).to(torch.float64)
        return cls(A, y, reduction=reduction, truth=truth)

    def zero_loss(self) -> float:
        return float(0.5 * self.scale * self.y.square().sum())

    def loss(self, Phi):
        return 0.5 * self.scale * (self.A @ Phi.reshape(-1) - self.y).square().sum()

    def loss_and_grad(self, Phi):
        r = self.A @ Phi.reshape(-1) - self.y
        return 0.5 * self.scale * r.square().sum(), (self.scale * (self.A.T @ r)).reshape(self.shape)


class Completion(Problem):
    """Matrix completion: ``f = c/2 sum_{(i,j) in Omega} (Phi_ij - M_ij)^2``, c = 1/|Omega| or 1.

    observed: (m, n) values (entries outside the mask are ignored and may be anything, NaN too);
    mask: (m, n) bool, True where observed. Optional ``truth`` (m, n) for the recovery error over
    all entries and ``test = (rows, cols, values)`` held-out entries for ``test_rmse``.
    Factored evaluations (``Phi = X Bt^T`` of any width k) use the observed entries only: row
    blocks of ``X Bt^T`` or gathers for the residual, CSR products for the gradients, so the cost
    is linear in k. ``sparse_max_width`` (default None: no limit) forms Phi densely above that width.
    Everything is allocated on ``observed``'s device.
    """

    def __init__(
        self,
        observed: torch.Tensor,
        mask: torch.Tensor,
        reduction: str = "mean",
        truth: torch.Tensor | None = None,
        test: tuple | None = None,
        sparse_max_width: int | None = None,
    ) -> None:
        if not isinstance(observed, torch.Tensor) or not isinstance(mask, torch.Tensor):
            raise ValueError("observed and mask must be torch tensors")
        if observed.ndim != 2:
            raise ValueError(f"observed must be a 2-D matrix, got shape {tuple(observed.shape)}")
        if mask.shape != observed.shape:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but observed has shape "
                f"{tuple(observed.shape)}; pass a boolean mask of the same shape as the matrix"
            )
        mask = mask.to(torch.bool)
        idx = mask.nonzero()
        if idx.shape[0] == 0:
            raise ValueError("the mask observes no entries; mark at least one observed entry True")
        self.shape = tuple(observed.shape)
        self.device = observed.device
        self.rows = idx[:, 0].contiguous()
        self.cols = idx[:, 1].contiguous()
        self.values = observed.to(torch.float64)[self.rows, self.cols].contiguous()
        if not torch.isfinite(self.values).all():
            bad = int((~torch.isfinite(self.values)).sum())
            raise ValueError(
                f"{bad} observed entries are NaN/Inf; drop them from the mask "
                "(mask &= torch.isfinite(observed)) or fill them"
            )
        self.reduction = _check_reduction(reduction)
        self.n_observed = int(self.rows.numel())
        self.scale = 1.0 / self.n_observed if reduction == "mean" else 1.0
        self.truth = None if truth is None else truth.to(torch.float64)
        if self.truth is not None and self.truth.shape != observed.shape:
            raise ValueError(f"truth has shape {tuple(self.truth.shape)}, expected {self.shape}")
        self.test = None
        if test is not None:
            r, c, v = test
            self.test = (r.long().to(self.device), c.long().to(self.device), v.to(self.device, torch.float64))
        self.sparse_max_width = sparse_max_width
        m, n = self.shape
        self._flat = self.rows * n + self.cols
        # CSR of the observed pattern (row-major, as nonzero() returns it) and of its transpose
        dev = self.device
        self._crow = torch.zeros(m + 1, dtype=torch.int64, device=dev)
        self._crow[1:] = torch.bincount(self.rows, minlength=m).cumsum(0)
        self._perm = torch.argsort(self.cols * m + self.rows)
        self._crow_t = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        self._crow_t[1:] = torch.bincount(self.cols, minlength=n).cumsum(0)
        self._col_t = self.rows[self._perm].contiguous()
        self._mask_dense: torch.Tensor | None = None

    @classmethod
    def from_entries(
        cls, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], **kwargs
    ) -> Completion:
        """Build from index lists (duplicates: the last one wins)."""
        dev = values.device
        M = torch.zeros(shape, dtype=torch.float64, device=dev)
        mask = torch.zeros(shape, dtype=torch.bool, device=dev)
        rows, cols = rows.long().to(dev), cols.long().to(dev)
        M[rows, cols] = values.to(torch.float64)
        mask[rows.long(), cols.long()] = True
        return cls(M, mask, **kwargs)

    @property
    def fraction(self) -> float:
        return self.n_observed / (self.shape[0] * self.shape[1])

    def mask(self) -> torch.Tensor:
        if self._mask_dense is None:
            mk = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
            mk.view(-1)[self._flat] = 1.0
            self._mask_dense = mk
        return self._mask_dense

    def observed_matrix(self) -> torch.Tensor:
        """(m, n) with the observed values and zeros elsewhere."""
        M = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        M.view(-1)[self._flat] = self.values
        return M

    def zero_loss(self) -> float:
        return float(0.5 * self.scale * self.values.dot(self.values))

    def loss(self, Phi):
        return 0.5 * self.scale * (Phi.reshape(-1)[self._flat] - self.values).square().sum()

    def loss_and_grad(self, Phi):
        r = Phi.reshape(-1).take(self._flat) - self.values
        G = torch.zeros(self.shape, dtype=Phi.dtype, device=Phi.device)
        G.view(-1)[self._flat] = self.scale * r
        return 0.5 * self.scale * r.dot(r), G

    def factored_loss_and_grads(self, X, Bt):
        if self.sparse_max_width is not None and X.shape[1] > self.sparse_max_width:
            return super().factored_loss_and_grads(X, Bt)
        return self._loss_and_grads_from_residual(self._residual(X, Bt), X, Bt)

    def _loss_and_grads_from_residual(self, r: torch.Tensor, X: torch.Tensor, Bt: torch.Tensor):
        m, n = self.shape
        loss = 0.5 * self.scale * r.dot(r)
        r.mul_(self.scale)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            S = torch.sparse_csr_tensor(
                self._crow, self.cols, r, (m, n), check_invariants=False, device=r.device
            )
            St = torch.sparse_csr_tensor(
                self._crow_t,
                self._col_t,
                r.index_select(0, self._perm),
                (n, m),
                check_invariants=False,
                device=r.device,
            )
        return loss, S @ Bt, St @ X

    _CHUNK = 8192  # entries per gather block: two (chunk, k) float64 buffers stay in cache

    # Above this observed fraction, computing row blocks of X Bt^T with a GEMM and picking the
    # observed entries beats gathering rows per entry (measured at d = 1000, k = 10, 20% observed:
    # 1.5 ms vs 4.5 ms); a per-entry gather costs ~15x more per entry than a GEMM output.
    DENSE_BLOCK_FRACTION = 0.07
    _BLOCK_BYTES = 1 << 20  # a (rows, n) float64 block of about 1 MiB stays in cache

    def _residual(self, X: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
        """``(X Bt^T)[rows, cols] - values`` (a fresh (N,) tensor). Dense-enough masks: row blocks
        of X Bt^T (about 1 MiB each) by GEMM, then the observed entries of each block; sparse masks:
        gathers in cache-sized blocks into reused buffers. Never an (m, n) or (N, k) temporary."""
        if self.fraction >= self.DENSE_BLOCK_FRACTION:
            return self._residual_row_blocks(X, Bt)
        k = X.shape[1]
        key = (k, X.dtype, X.device)
        if getattr(self, "_buf_key", None) != key:
            C = min(self._CHUNK, self.n_observed)
            self._buf = (
                torch.empty(C, k, dtype=X.dtype, device=X.device),
                torch.empty(C, k, dtype=X.dtype, device=X.device),
                torch.ones(k, dtype=X.dtype, device=X.device),
            )
            self._blocks = [(s, min(s + C, self.n_observed)) for s in range(0, self.n_observed, C)]
            self._buf_key = key
        b1, b2, ones = self._buf
        out = torch.empty(self.n_observed, dtype=X.dtype, device=X.device)
        X, Bt = X.contiguous(), Bt.contiguous()
        for s, e in self._blocks:
            x1, x2 = b1[: e - s], b2[: e - s]
            torch.index_select(X, 0, self.rows[s:e], out=x1)
            torch.index_select(Bt, 0, self.cols[s:e], out=x2)
            x1.mul_(x2)
            torch.mv(x1, ones, out=out[s:e])
        return out.sub_(self.values)

    def _residual_row_blocks(self, X: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_row_blocks", None) is None:
            m, n = self.shape
            step = max(1, self._BLOCK_BYTES // (8 * n))
            blocks = []
            for s in range(0, m, step):
                e = min(s + step, m)
                a, b = int(self._crow[s]), int(self._crow[e])
                if b > a:  # entries a:b lie in rows s:e (row-major order); their offsets inside the block
                    blocks.append((s, e, a, b, (self.rows[a:b] - s) * n + self.cols[a:b]))
            self._row_blocks = blocks
        out = torch.empty(self.n_observed, dtype=X.dtype, device=X.device)
        BtT = Bt.T
        for s, e, a, b, local in self._row_blocks:
            torch.take(X[s:e] @ BtT, local, out=out[a:b])
        return out.sub_(self.values)

    def predict(
        self, X: torch.Tensor, Bt: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """Entries ``(X Bt^T)[rows, cols]`` without forming the matrix."""
        return (X.index_select(0, rows) * Bt.index_select(0, cols)).sum(1)

    def test_rmse(self, X: torch.Tensor, Bt: torch.Tensor) -> float | None:
        """RMSE on the held-out ``test`` entries for ``Phi = X Bt^T`` (None without a test set)."""
        if self.test is None:
            return None
        r, c, v = self.test
        return float((self.predict(X, Bt, r, c) - v).square().mean().sqrt())

    def __getstate__(self):  # the gather buffers are a cache, not state
        d = dict(self.__dict__)
        for key in ("_buf", "_blocks", "_buf_key", "_row_blocks"):
            d.pop(key, None)
        return d
