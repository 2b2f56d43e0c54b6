"""scikit-learn-style completion estimators with one interface:

    est = Estimator(**params).fit(X, mask)      # X (m, n) dense (mask / NaN) or sparse COO / CSR
    est.predict(rows, cols)                      # completed entries, data units
    est.transform() / est.completed_             # the completed (m, n) matrix
    est.status_, est.n_iter_, est.history_, est.result_

- :class:`DeepMatrixCompleter`: :func:`~torchlowrank.matrix.complete` (compressed deep
  factorization; held-out validation and the mean-model fallback by default);
- :class:`ALSCompleter`: :func:`~torchlowrank.matrix.als` (ridge ALS with biases, sparse; ridge
  chosen on held-out entries by default);
- :class:`SoftImputeCompleter`: soft-impute (lam chosen on held-out entries by a warm-started
  path by default; factored iterates, sparse inputs of any size);
- :class:`~torchlowrank.matrix.MeanModel`: ``mu + b_i + c_j``, the peer every other one must beat.

Constructor arguments are stored as given (``get_params`` / ``set_params``); fitted results end
with an underscore. Every estimator holds its own seed (no global RNG is touched).
"""

from __future__ import annotations

import inspect

import torch

from .centering import MeanModel

__all__ = ["DeepMatrixCompleter", "ALSCompleter", "SoftImputeCompleter", "MeanModel"]


class _Completer:
    def get_params(self, deep: bool = True) -> dict:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {k: getattr(self, k) for k in names}

    def set_params(self, **params) -> _Completer:
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {k!r}; valid: {sorted(valid)}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def _check_fitted(self) -> None:
        if not hasattr(self, "result_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit(X, mask) first")

    def transform(self, X=None) -> torch.Tensor:
        """The completed (m, n) matrix (the argument is ignored: the fitted matrix)."""
        return self.completed_

    def fit_transform(self, X, mask=None) -> torch.Tensor:
        return self.fit(X, mask).completed_


class DeepMatrixCompleter(_Completer):
    """:func:`~torchlowrank.matrix.complete` as an estimator (its arguments; ``result_`` is the
    :class:`~torchlowrank.matrix.CompletionResult`). ``predict`` never forms the matrix when the
    result is ridge ALS or the mean model (always so on the sparse route, ``sparse=True`` or
    m n > 2^26); ``completed_`` does (O(m n))."""

    def __init__(
        self,
        depth: int = 3,
        rank: int | None = None,
        *,
        holdout: float = 0.1,
        max_iters: int = 20_000,
        tol: float = 1e-9,
        time_limit: float | None = None,
        weight_decay: float = 0.0,
        init_scale: float = 1e-3,
        patience: int | None = None,
        seed: int = 0,
        sparse: bool | None = None,
    ):
        self.depth, self.rank, self.holdout, self.max_iters, self.tol = depth, rank, holdout, max_iters, tol
        self.sparse = sparse
        self.time_limit, self.weight_decay, self.init_scale, self.patience, self.seed = (
            time_limit,
            weight_decay,
            init_scale,
            patience,
            seed,
        )

    def fit(self, X, mask=None, validation: tuple | None = None) -> DeepMatrixCompleter:
        from .complete import complete

        res = complete(
            X,
            mask,
            depth=self.depth,
            rank=self.rank,
            holdout=self.holdout,
            max_iters=self.max_iters,
            tol=self.tol,
            time_limit=self.time_limit,
            weight_decay=self.weight_decay,
            init_scale=self.init_scale,
            patience=self.patience,
            seed=self.seed,
            validation=validation,
            sparse=self.sparse,
        )
        self.result_ = res
        self.status_ = res.status
        self.n_iter_ = res.history.n_iters
        self.history_ = res.history
        return self

    def predict(self, rows, cols) -> torch.Tensor:
        self._check_fitted()
        return self.result_.predict(rows, cols)

    @property
    def completed_(self) -> torch.Tensor:
        self._check_fitted()
        return self.result_.matrix


class ALSCompleter(_Completer):
    """:func:`~torchlowrank.matrix.als` as an estimator (``result_`` is the
    :class:`~torchlowrank.matrix.ALSResult`; ``predict`` never forms the matrix)."""

    def __init__(
        self,
        rank: int = 10,
        *,
        reg="auto",
        bias_reg: float | None = None,
        max_iters: int = 500,
        tol: float = 1e-7,
        holdout: float = 0.1,
        time_limit: float | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ):
        self.rank, self.reg, self.bias_reg, self.max_iters, self.tol = rank, reg, bias_reg, max_iters, tol
        self.holdout, self.time_limit, self.seed, self.dtype = holdout, time_limit, seed, dtype

    def fit(self, X, mask=None, validation: tuple | None = None) -> ALSCompleter:
        from .als import als

        res = als(
            X,
            mask,
            self.rank,
            reg=self.reg,
            bias_reg=self.bias_reg,
            max_iters=self.max_iters,
            tol=self.tol,
            holdout=self.holdout,
            time_limit=self.time_limit,
            seed=self.seed,
            dtype=self.dtype,
            validation=validation,
        )
        self.result_ = res
        self.status_ = res.status
        self.n_iter_ = res.n_iters
        self.history_ = {"train_rmse": res.train_rmse, "val_rmse": res.val_rmse, "reg_path": res.reg_path}
        self.reg_ = res.reg
        return self

    def predict(self, rows, cols) -> torch.Tensor:
        self._check_fitted()
        return self.result_.predict(torch.as_tensor(rows), torch.as_tensor(cols))

    @property
    def completed_(self) -> torch.Tensor:
        self._check_fitted()
        return self.result_.matrix


class SoftImputeCompleter(_Completer):
    """Soft-impute as an estimator: ``lam=None`` (default) chooses lam on held-out entries
    (:func:`~torchlowrank.matrix.soft_impute_path`), a number runs
    :func:`~torchlowrank.matrix.soft_impute` at it. ``result_`` is the factored
    :class:`~torchlowrank.matrix.SoftImputeFit` (memory O(|Omega| + (m + n) k): ``fit`` and
    ``predict`` take sparse inputs of any size; ``completed_`` forms the (m, n) matrix)."""

    def __init__(
        self,
        lam: float | None = None,
        *,
        max_rank: int | None = 100,
        max_iters: int = 100,
        tol: float = 1e-5,
        holdout: float = 0.1,
        time_limit: float | None = None,
        seed: int = 0,
    ):
        self.lam, self.max_rank, self.max_iters, self.tol = lam, max_rank, max_iters, tol
        self.holdout, self.time_limit, self.seed = holdout, time_limit, seed

    def fit(self, X, mask=None, validation: tuple | None = None) -> SoftImputeCompleter:
        from .als import as_entries
        from .baselines import fit_soft_impute_path, soft_impute_fit

        E = as_entries(X, mask)
        if self.lam is None:
            fit, lam, path, unconverged = fit_soft_impute_path(
                E,
                validation,
                max_rank=self.max_rank,
                max_iters=self.max_iters,
                tol=self.tol,
                time_limit=self.time_limit,
                holdout=self.holdout,
                seed=self.seed,
            )
            self.history_ = {"path": path}
            self.status_ = "not_converged" if unconverged else "converged"
            self.n_iter_ = sum(p["n_iters"] for p in path)
        else:
            fit, info = soft_impute_fit(
                E,
                self.lam,
                max_rank=self.max_rank,
                max_iters=self.max_iters,
                tol=self.tol,
                time_limit=self.time_limit,
                seed=self.seed,
            )
            lam = self.lam
            self.history_ = dict(info)
            self.status_, self.n_iter_ = info["status"], info["n_iters"]
        self.result_ = fit
        self.lam_ = lam
        return self

    def predict(self, rows, cols) -> torch.Tensor:
        self._check_fitted()
        return self.result_.predict(rows, cols)

    @property
    def completed_(self) -> torch.Tensor:
        self._check_fitted()
        return self.result_.matrix
