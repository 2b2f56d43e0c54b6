"""Exact polish of a deep factorization's solution at the rank its training picked (used by
:func:`complete`).

Gradient descent from a small initialisation learns the target's singular directions one after
the other (the implicit low-rank bias of depth), then converges only linearly, at a rate set by
the conditioning. The polish keeps the first part and replaces the second: once the end-to-end
matrix's singular values split into ``r`` that escaped the initialisation and the rest that did
not (a clear gap), it runs alternating least squares at rank ``r`` (with the problem's row /
column biases refitted in the same least squares) started from the network's own solution, and
hands the result back only if it fits the observed entries to the trainer's tolerance. The trainer
re-checks that fit itself and otherwise restores the network and continues descent; a rank that is
too small cannot fit (one more direction has yet to escape), so a failed polish is simply retried
later, after the spectrum changed or the iteration count doubled. Directions the network has not
learnt yet are added greedily from the residual (each only past a stalled fit, and only while it
takes >= 20% of the residual); a fit that needed them must also predict a held-out 5% of the
observed entries (so an exact fit with a spurious direction is refused).
"""

from __future__ import annotations

import math
import time

import torch

from .compressed import CompressedFactorization

__all__ = ["RankPolish", "escaped_rank", "als_with_biases", "als_with_biases_entries"]


def escaped_rank(s: torch.Tensor, gap: float = 1e3, floor: float = 1e-4) -> int | None:
    """The number r of singular values ``s`` (descending) that escaped the initialisation: the
    first index with ``s_r / s_{r+1} >= gap``, all of ``s_1 .. s_r >= floor * s_1``. None when
    there is no such clear gap (or when every value is above it: the width may be too small)."""
    s = s.to(torch.float64)
    if s.numel() < 2 or not float(s[0]) > 0:
        return None
    top = float(s[0])
    for i in range(s.numel() - 1):
        if float(s[i]) < floor * top:
            return None
        if float(s[i]) >= gap * max(float(s[i + 1]), 1e-300):
            return i + 1
    return None


def _solve(Wt: torch.Tensor, T: torch.Tensor, F: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """Rows of ``argmin_x sum_j W_ij (x . F_j - T_ij)^2 + sum_k diag_k x_k^2`` for every row i:
    Wt (a, b) 0/1 weights, T (a, b) targets (anything where W = 0), F (b, q) features."""
    q = F.shape[1]
    G = (Wt @ (F[:, :, None] * F[:, None, :]).reshape(F.shape[0], q * q)).reshape(-1, q, q)
    G.diagonal(dim1=1, dim2=2).add_(diag)
    # rows with fewer observations than unknowns and no ridge: a tiny jitter keeps them solvable
    G.diagonal(dim1=1, dim2=2).add_(
        1e-13 * G.diagonal(dim1=1, dim2=2).amax(dim=1, keepdim=True).clamp_min(1e-300)
    )
    rhs = (Wt * T) @ F
    return torch.linalg.solve(G, rhs.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def als_with_biases(
    W: torch.Tensor,
    Y: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    lam: float,
    bias_reg: float,
    fit_biases: bool,
    target_sse: float,
    max_sweeps: int = 100,
    min_gain: float = 0.9,
    deadline: float | None = None,
):
    """ALS for ``Y_ij ~ U_i . V_j + b_i + c_j`` on the entries where ``W`` (m, n; 0/1) is 1:
    ``min sum_W (U V^T + b + c - Y)^2 + lam (||U||^2 + ||V||^2) + bias_reg (||b||^2 + ||c||^2)``,
    each half-sweep the exact joint solve of (U_i, b_i) for every row, then of (V_j, c_j) for every
    column (biases held at b, c when ``fit_biases`` is False). Stops when the sum of squared
    residuals is <= ``target_sse`` or when a sweep reduced it by less than the factor ``min_gain``
    (after 5 sweeps), or before a sweep that would end past ``deadline`` (``time.perf_counter()``
    seconds). Returns (U, V, b, c, sse, sweeps)."""
    m, n = Y.shape
    k = U.shape[1]
    dev, dt = Y.device, Y.dtype
    one_m, one_n = torch.ones(m, 1, dtype=dt, device=dev), torch.ones(n, 1, dtype=dt, device=dev)
    diag = torch.full((k + 1,), lam, dtype=dt, device=dev)
    diag[k] = bias_reg
    sse, prev = math.inf, math.inf
    it, last = 0, 0.0
    for it in range(1, max_sweeps + 1):
        if deadline is not None and time.perf_counter() + last > deadline:
            it -= 1
            break
        t0 = time.perf_counter()
        if fit_biases:
            x = _solve(W, Y - c[None, :], torch.cat([V, one_n], 1), diag)
            U, b = x[:, :k], x[:, k]
            x = _solve(W.T, (Y - b[:, None]).T, torch.cat([U, one_m], 1), diag)
            V, c = x[:, :k], x[:, k]
        else:
            U = _solve(W, Y - b[:, None] - c[None, :], V, diag[:k])
            V = _solve(W.T, (Y - b[:, None] - c[None, :]).T, U, diag[:k])
        R = W * (U @ V.T + b[:, None] + c[None, :] - Y)
        sse = float(R.square().sum())
        last = time.perf_counter() - t0
        if not math.isfinite(sse) or sse <= target_sse or (it >= 5 and sse > min_gain * prev):
            break
        prev = sse
    return U, V, b, c, sse, it


@torch.no_grad()
def als_with_biases_entries(
    E,
    y: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    lam: float,
    bias_reg: float,
    fit_biases: bool,
    target_sse: float,
    max_sweeps: int = 100,
    min_gain: float = 0.9,
    deadline: float | None = None,
):
    """:func:`als_with_biases` on the observed entries only: ``E`` an
    :class:`~torchlowrank.matrix.sparse.Entries` of the pattern, ``y`` (N,) the targets at its
    entries. The same least squares, solved row by row by
    :func:`~torchlowrank.matrix.sparse.ridge_solve_rows` (O(|Omega| k^2 + (m + n) k^3) per sweep, no
    (m, n) array); the same stopping rules. Returns
    (U, V, b, c, sse, sweeps)."""
    from .sparse import entry_dots, ridge_solve_rows

    k = U.shape[1]
    dev, dt = y.device, y.dtype
    m, n = E.shape
    diag = torch.full((k + 1,), lam, dtype=dt, device=dev)
    diag[k] = bias_reg
    ws: dict = {}
    sse, prev = math.inf, math.inf
    it, last = 0, 0.0

    def solve(F, target, offset=None, transpose=False):
        d = diag if F.shape[1] == k + 1 else diag[:k]
        return ridge_solve_rows(
            E, F, target, d, offset=offset, transpose=transpose, jitter=1e-13, workspace=ws
        )[0]

    for it in range(1, max_sweeps + 1):
        if deadline is not None and time.perf_counter() + last > deadline:
            it -= 1
            break
        t0 = time.perf_counter()
        if fit_biases:
            x = solve(torch.cat([V, torch.ones(n, 1, dtype=dt, device=dev)], 1), y, offset=c)
            U, b = x[:, :k], x[:, k].contiguous()
            x = solve(torch.cat([U, torch.ones(m, 1, dtype=dt, device=dev)], 1), y, offset=b, transpose=True)
            V, c = x[:, :k], x[:, k].contiguous()
        else:
            t = y - b[E.rows] - c[E.cols]
            U = solve(V, t)
            V = solve(U, t, transpose=True)
        U, V = U.contiguous(), V.contiguous()
        r = entry_dots(U, V, E.rows, E.cols) + b[E.rows] + c[E.cols] - y
        sse = float(r.dot(r))
        last = time.perf_counter() - t0
        if not math.isfinite(sse) or sse <= target_sse or (it >= 5 and sse > min_gain * prev):
            break
        prev = sse
    return U, V, b, c, sse, it


class RankPolish:
    """The polish ``complete`` passes to :func:`train_gd` (module docstring) for a
    :class:`CompressedFactorization` on a problem with ``y`` / ``b`` / ``c`` (the normalised
    completion of :func:`complete`).

    At a call (every trainer check after the escape) it forms the end-to-end matrix's singular
    values from the k-wide factors (QR of each, SVD of a k x k product: O((m + n) k^2)), and tries
    ALS at ``r = escaped_rank(...)`` when r changed since the last attempt or the iteration count
    doubled. A fit at more than the escaped rank is accepted only if, refitted without a seeded 5%
    of the observed entries, it predicts them to ``holdout_tol`` (relative): the check that the rank
    is right, not just enough to fit. ``attempts`` records (iteration, rank, relative residual
    reached, or the held-out error) for every attempt."""

    def __init__(
        self,
        gap: float = 1e3,
        floor: float = 1e-4,
        max_sweeps: int = 100,
        ridge: float = 1e-12,
        extra: int = 4,
        holdout_tol: float = 1e-6,
    ):
        self.gap, self.floor, self.max_sweeps, self.ridge, self.extra = gap, floor, max_sweeps, ridge, extra
        self.holdout_tol = holdout_tol
        self.attempts: list[tuple[int, int, float]] = []
        self._last: tuple[int, int] | None = None  # (iteration, rank) of the last attempt
        self._dense = None
        self._entries = None  # (problem, its Entries): the sparse pattern the polish works on
        self.deadline: float | None = None  # set by the trainer from its time_limit

    def _entries_of(self, problem):
        """The observed pattern of ``problem`` as :class:`~torchlowrank.matrix.sparse.Entries` (cached)."""
        from .sparse import Entries

        if self._entries is None or self._entries[0] is not problem:
            self._entries = (problem, Entries(problem.rows, problem.cols, problem.y, problem.shape))
        return self._entries[1]

    def _dense_problem(self, problem):
        if self._dense is None:
            m, n = problem.shape
            W = torch.zeros((m, n), dtype=torch.float64, device=problem.y.device)
            Y = torch.zeros_like(W)
            W[problem.rows, problem.cols] = 1.0
            Y[problem.rows, problem.cols] = problem.y
            self._dense = (W, Y)
        return self._dense

    @torch.no_grad()
    def __call__(self, t: int, model, problem, target_loss: float) -> str | None:
        if not isinstance(model, CompressedFactorization):
            return None
        X, Bt = model.factor_pair()
        Qx, Rx = torch.linalg.qr(X)
        Qb, Rb = torch.linalg.qr(Bt)
        P, s, Qh = torch.linalg.svd(Rx @ Rb.T)
        r = escaped_rank(s, self.gap, self.floor)
        if r is None:
            return None
        if self._last is not None and r == self._last[1] and t < 2 * self._last[0]:
            return None
        self._last = (t, r)
        E = self._entries_of(problem)
        target_sse = 0.5 * (2.0 * target_loss / problem.scale)  # loss = scale / 2 * sse; aim at tol / sqrt(2)
        y2 = max(float(problem.y.square().sum()), 1e-300)
        sq = s[:r].sqrt()
        U, V = (Qx @ P[:, :r]) * sq, (Qb @ Qh[:r].T) * sq
        b, c = problem.b.clone(), problem.c.clone()
        lam = self.ridge * float(s[0])
        prev_rel = math.inf
        for extra in range(self.extra + 1):
            if U.shape[1] > min(problem.shape) // 2 or (
                self.deadline is not None and time.perf_counter() > self.deadline
            ):
                break
            if (
                extra
            ):  # one more direction: the top singular pair of the rank-r fit's residual (sparse, seeded)
                from .sparse import entry_dots, sparse_top_svd

                res = problem.y - entry_dots(U, V, E.rows, E.cols) - b[E.rows] - c[E.cols]
                p = len(E) / (problem.shape[0] * problem.shape[1])
                pu, ps, pv = sparse_top_svd(
                    E, res / p, 1, generator=torch.Generator().manual_seed(t), power_iters=8
                )
                g = float(ps[0]) ** 0.5
                U, V = torch.cat([U, pu[:, :1] * g], 1), torch.cat([V, pv[:, :1] * g], 1)
            U, V, b, c, sse, sweeps = als_with_biases_entries(
                E,
                problem.y,
                U,
                V,
                b,
                c,
                lam=lam,
                bias_reg=problem.reg,
                fit_biases=problem.fit_biases,
                target_sse=target_sse,
                max_sweeps=self.max_sweeps,
                deadline=self.deadline,
            )
            rel = math.sqrt(max(sse, 0.0) / y2)
            self.attempts.append((t, U.shape[1], rel))
            if sse <= target_sse and extra:
                ok, held = self._holdout_check(problem, None, None, U, V, b, c, lam, target_sse)
                self.attempts.append((t, U.shape[1], held))
                if not ok:  # fits, but does not predict held-out entries: more directions than the data holds
                    return None
            if sse <= target_sse:
                self._write(model, U, V)
                problem.load_trained_state((b, c))
                how = (
                    f"the escaped rank {r}"
                    if not extra
                    else f"the escaped rank {r} + {extra} direction(s) from the residual"
                )
                return f"polished by ALS at rank {U.shape[1]} ({how}) after {sweeps} sweeps at iteration {t}"
            # add a direction only past a genuine rank-limited optimum (ALS stalled, not out of sweeps)
            # and, beyond the first, only while the last one took at least a fifth of the residual
            # (a fit stalled below 1e-4 is more likely a slowly converging exact fit than a missing direction)
            if sweeps >= self.max_sweeps or rel < 1e-4 or (extra >= 1 and rel > 0.8 * prev_rel):
                break
            prev_rel = rel
        return None

    def _holdout_check(self, problem, W, Y, U, V, b, c, lam, target_sse) -> tuple[bool, float]:
        """Refit at the same rank without a seeded 5% of the observed entries (from this solution)
        and predict them: an exactly low-rank matrix at its true rank predicts them to ~tol, a fit
        with a spurious direction does not. Returns (relative held-out error <= holdout_tol, error)."""
        n_obs = problem.rows.numel()
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(n_obs, generator=g, device="cpu")[: max(1, n_obs // 20)].to(problem.rows.device)
        rh, ch, yh = problem.rows[pick], problem.cols[pick], problem.y[pick]
        keep = torch.ones(n_obs, dtype=torch.bool, device=problem.rows.device)
        keep[pick] = False
        E2 = self._entries_of(problem).subset(
            keep
        )  # W, Y (dense, from _dense_problem) are not needed any more
        U2, V2, b2, c2, _, _ = als_with_biases_entries(
            E2,
            problem.y[keep],
            U,
            V,
            b,
            c,
            lam=lam,
            bias_reg=problem.reg,
            fit_biases=problem.fit_biases,
            target_sse=0.95 * target_sse,
            max_sweeps=self.max_sweeps,
            deadline=self.deadline,
        )
        pred = (U2[rh] * V2[ch]).sum(1) + b2[rh] + c2[ch]
        err = float((pred - yh).norm() / yh.norm().clamp_min(1e-300))
        return err <= self.holdout_tol, err

    @staticmethod
    def _write(model: CompressedFactorization, U: torch.Tensor, V: torch.Tensor) -> None:
        """Set the network to ``U V^T`` exactly, balanced: left = P, inner = diag(s^(1/L)), right = Q
        on the first r of its k columns (zero beyond)."""
        Qu, Ru = torch.linalg.qr(U)
        Qv, Rv = torch.linalg.qr(V)
        P, s, Qh = torch.linalg.svd(Ru @ Rv.T)
        r, k, L = U.shape[1], model.rank, model.depth
        left = torch.zeros_like(model.left)
        right = torch.zeros_like(model.right)
        left[:, :r] = Qu @ P
        right[:, :r] = Qv @ Qh.T
        d = torch.zeros(k, dtype=s.dtype, device=s.device)
        d[:r] = s.clamp_min(0) ** (1.0 / L)
        model.left.copy_(left)
        model.right.copy_(right)
        for C in model.inner:
            C.copy_(torch.diag(d))
