"""Robust linear algebra for low-rank work: truncated / randomized SVD, orthonormal bases,
orthogonal initialisation and principal angles.

Every routine computes in float32 or float64 (never in bf16/fp16 and never under autocast) and
returns results in the input's dtype, so it can be called on the weights of a mixed-precision model.
"""

from __future__ import annotations

import torch

__all__ = [
    "compute_dtype",
    "hashed_sketch",
    "sign_fixed",
    "check_finite",
    "robust_svd",
    "truncated_svd",
    "randomized_svd",
    "orthonormal_basis",
    "orthogonal_init",
    "principal_angles",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype (bf16, fp16, fp32) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_finite(A: torch.Tensor, what: str = "matrix") -> None:
    """Raise ``ValueError`` naming the shape if ``A`` holds NaN or Inf."""
    if not torch.isfinite(A).all():
        n_bad = int((~torch.isfinite(A)).sum())
        raise ValueError(
            f"{what} of shape {tuple(A.shape)} contains {n_bad} NaN/Inf value(s); "
            "check the model or data for divergence before computing an SVD"
        )


def _as_matrix(A: torch.Tensor, what: str = "A") -> torch.Tensor:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {tuple(A.shape)}")
    if not (A.is_floating_point()):
        raise ValueError(f"{what} must be a floating-point tensor, got {A.dtype}")
    return A


def robust_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``A = U diag(S) Vh`` in the compute dtype, with fallbacks instead of a crash.

    Order of attempts: the default driver; on CUDA the ``gesvd`` driver; float64; finally a tiny
    relative jitter (1e-10 of the norm in float64) that perturbs singular values by at most that much.
    A: (m, n) -> U: (m, k), S: (k,), Vh: (k, n) with k = min(m, n).
    """
    A = _as_matrix(A)
    check_finite(A)
    work = A.detach().to(compute_dtype(A.dtype))
    with torch.autocast(device_type=work.device.type, enabled=False):
        try:
            return torch.linalg.svd(work, full_matrices=False)
        except RuntimeError:
            pass
        if work.is_cuda:
            try:
                return torch.linalg.svd(work, full_matrices=False, driver="gesvd")
            except RuntimeError:
                pass
        w64 = work.double()
        try:
            U, S, Vh = torch.linalg.svd(w64, full_matrices=False)
        except RuntimeError:
            scale = float(w64.abs().max()) or 1.0
            gen = torch.Generator(device=w64.device).manual_seed(0)
            noise = torch.randn(w64.shape, generator=gen, device=w64.device, dtype=w64.dtype)
            U, S, Vh = torch.linalg.svd(w64 + 1e-10 * scale * noise, full_matrices=False)
        return U.to(work.dtype), S.to(work.dtype), Vh.to(work.dtype)


def randomized_svd(
    A: torch.Tensor,
    rank: int,
    oversample: int = 10,
    n_iter: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized range finder (Halko, Martinsson & Tropp 2011) with power iterations.

    Accurate to near the best rank-``rank`` error when the spectrum decays; each power iteration
    re-orthonormalises to stay stable in float32. Works in the compute dtype.
    A: (m, n) -> U: (m, rank), S: (rank,), Vh: (rank, n).
    """
    A = _as_matrix(A)
    m, n = A.shape
    work = A.detach().to(compute_dtype(A.dtype))
    k = min(rank + oversample, m, n)
    if generator is None:
        generator = torch.Generator(device=work.device).manual_seed(0)
    with torch.autocast(device_type=work.device.type, enabled=False):
        omega = torch.randn(n, k, generator=generator, device=work.device, dtype=work.dtype)
        Q, _ = torch.linalg.qr(work @ omega)
        for _ in range(n_iter):
            Z, _ = torch.linalg.qr(work.T @ Q)
            Q, _ = torch.linalg.qr(work @ Z)
        B = Q.T @ work  # (k, n)
        Ub, S, Vh = robust_svd(B)
        U = Q @ Ub
    return U[:, :rank], S[:rank], Vh[:rank]


def _auto_uses_randomized(m: int, n: int, rank: int, oversample: int) -> bool:
    # The randomized method pays off when the sketch is a small fraction of the matrix.
    return min(m, n) >= 256 and (rank + oversample) * 4 <= min(m, n)


def truncated_svd(
    A: torch.Tensor,
    rank: int,
    method: str = "auto",
    *,
    oversample: int = 10,
    n_iter: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``A``: ``A ~= U @ diag(S) @ Vh``.

    A: (m, n) -> U: (m, rank), S: (rank,) descending, Vh: (rank, n), all in ``A``'s dtype.

    method: ``"full"`` (thin SVD then cut), ``"randomized"`` (Halko et al., ``oversample`` extra
    columns, ``n_iter`` power iterations) or ``"auto"`` (randomized when ``rank + oversample`` is at
    most a quarter of ``min(m, n)`` and ``min(m, n) >= 256``). Computes in float32/float64 whatever
    the input dtype; falls back to another driver / float64 / tiny jitter if LAPACK fails to converge.
    Raises ``ValueError`` for NaN/Inf input or a rank outside ``1..min(m, n)``.
    """
    A = _as_matrix(A)
    m, n = A.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(
            f"rank must be an int in 1..{min(m, n)} for a matrix of shape {(m, n)}, got {rank!r}"
        )
    if method not in ("auto", "full", "randomized"):
        raise ValueError(f"method must be 'auto', 'full' or 'randomized', got {method!r}")
    check_finite(A)
    if method == "auto":
        method = "randomized" if _auto_uses_randomized(m, n, rank, oversample) else "full"
    if method == "full":
        U, S, Vh = robust_svd(A)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        U, S, Vh = randomized_svd(A, rank, oversample=oversample, n_iter=n_iter, generator=generator)
    return U.to(A.dtype), S.to(A.dtype), Vh.to(A.dtype)


def orthonormal_basis(A: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Orthonormal basis of the column span of ``A`` (m, k) -> (m, j), j <= k.

    Uses an SVD so rank-deficient inputs are handled: directions with singular value below
    ``rtol * s_max`` (default ``max(m, k) * eps`` of the compute dtype) are dropped.
    """
    A = _as_matrix(A)
    U, S, _ = robust_svd(A)
    if S.numel() == 0 or S[0] == 0:
        return U[:, :0].to(A.dtype)
    if rtol is None:
        rtol = max(A.shape) * torch.finfo(S.dtype).eps
    keep = int((S > rtol * S[0]).sum())
    return U[:, :keep].to(A.dtype)


def orthogonal_init(
    rows: int,
    cols: int,
    scale: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A ``(rows, cols)`` matrix with orthonormal columns (rows >= cols) or rows, times ``scale``.

    Drawn uniformly (Haar) by QR of a Gaussian matrix with the sign fix of Mezzadri (2007), so every
    singular value equals ``scale`` exactly up to rounding.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"orthogonal_init needs positive dimensions, got ({rows}, {cols})")
    big, small = max(rows, cols), min(rows, cols)
    g = torch.randn(big, small, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(g)
    Q = Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(()).double())
    if rows < cols:
        Q = Q.T
    return (scale * Q).to(dtype=dtype, device=device)


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of ``A`` (m, p) and ``B`` (m, q).

    Bases are orthonormalised first; returns ``min(dim span A, dim span B)`` angles computed as
    arccos of the singular values of ``Qa^T Qb`` (clamped to [0, 1]); 0 means a shared direction,
    pi/2 an orthogonal one.
    """
    A = _as_matrix(A, "A")
    B = _as_matrix(B, "B")
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"subspaces must live in the same space: A has {A.shape[0]} rows, B has {B.shape[0]}"
        )
    dt = torch.promote_types(compute_dtype(A.dtype), compute_dtype(B.dtype))
    Qa = orthonormal_basis(A.to(dt))
    Qb = orthonormal_basis(B.to(dt))
    if Qa.shape[1] == 0 or Qb.shape[1] == 0:
        return torch.zeros(0, dtype=dt, device=A.device)
    if Qb.shape[1] > Qa.shape[1]:
        Qa, Qb = Qb, Qa
    # arccos of the cosines loses accuracy for small angles (cos ~ 1); there the sines of the
    # residual (I - Qa Qa^T) Qb are accurate (Bjorck & Golub 1973), so use each where it is reliable.
    cos = torch.linalg.svdvals(Qa.T @ Qb).clamp(0.0, 1.0)  # descending
    sin = torch.linalg.svdvals(Qb - Qa @ (Qa.T @ Qb)).clamp(0.0, 1.0).flip(0)  # ascending
    angles = torch.where(cos**2 >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    return angles.sort().values


def hashed_sketch(n: int, k: int, seed: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An (n, k) random test matrix for range finders, entries uniform in [-1, 1), computed on the
    device from a counter-based integer hash (splitmix64) of (seed, index).

    Unlike ``torch.randn`` with a generator, it is bit-identical on every device and in every dtype
    (up to the final rounding to ``dtype``), and needs no host-to-device copy: a randomized SVD on a
    GPU follows the CPU run and never waits for the host.
    """
    x = torch.arange(n * k, dtype=torch.int64, device=device) + (seed * 0x632BE59BD9B4E019) % (2**62)
    x = x * 0x5851F42D4C957F2D + 0x14057B7EF767814F  # wraps modulo 2^64 like every int64 product here
    x = (x ^ (x >> 30)) * 0x1CE4E5B9  # xor-shift-multiply rounds (arithmetic shifts: still deterministic)
    x = (x ^ (x >> 27)) * 0x133111EB
    x = x ^ (x >> 31)
    u = (x & ((1 << 24) - 1)).to(torch.float64) / float(1 << 23) - 1.0  # 24 random bits -> [-1, 1)
    return u.reshape(n, k).to(dtype)


def sign_fixed(X: torch.Tensor, *partners: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """X (..., n, k) with each column flipped so that its largest-|entry| component is positive, and
    the same columns of each partner (..., p, k) flipped with it (the right singular vectors of the
    left ones X): singular vectors, defined up to sign, then no longer depend on the device's LAPACK
    or the dtype. No host synchronisation."""
    top = torch.gather(X, -2, X.abs().argmax(dim=-2, keepdim=True))
    sign = torch.where(top < 0, -1.0, 1.0).to(X.dtype)
    return (X * sign, *(P * sign for P in partners))
