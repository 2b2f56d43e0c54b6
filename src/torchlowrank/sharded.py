"""Helpers for parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): ``DTensor``s.

FSDP2 shards every parameter on dim 0 over a 1-D device mesh (``placements == (Shard(0),)``,
``torch.chunk`` sizes: the last ranks may hold fewer rows, or none). The linear algebra of the
optimizers and regularizers runs on the local rows with the all-reduce pattern: for a row-sharded
G (m, n), G^T G = sum over ranks of G_loc^T G_loc, and G^T X = sum of G_loc^T X_loc for an X (m, k)
sharded like G; products G Y with a replicated Y stay local. Nothing here forms a full (m, n) matrix.

Plain tensors pass through every helper unchanged (one process, DDP), so callers need one code path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_dtensor",
    "local",
    "row_mesh",
    "all_reduce_sum",
    "gram",
    "replicated",
    "shard_rows",
    "from_rows",
    "gather_rows",
    "reduce_scatter_rows",
    "is_sharded_module",
    "qr_rows",
    "sign_fixed_rows",
]


def _dtensor_types():
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    return DTensor, Partial, Replicate, Shard


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter, its gradient, its state)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (it shares storage: in-place ops on it update the DTensor), or ``t``."""
    return t.to_local() if is_dtensor(t) else t


def row_mesh(t: torch.Tensor, what: str):
    """The 1-D device mesh over which ``t`` is sharded on dim 0 (FSDP2's default), ``None`` for a
    plain tensor. ValueError for any other layout (2-D meshes such as HSDP, ``Shard(1)``, a
    replicated DTensor): the callers' all-reduce algebra assumes rows split over one group."""
    if not is_dtensor(t):
        return None
    _, _, _, Shard = _dtensor_types()
    mesh, placements = t.device_mesh, tuple(t.placements)
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(
            f"{what}: supported are plain tensors and DTensors sharded on dim 0 over a 1-D mesh "
            f"(fully_shard's default); got placements {placements} on a {mesh.ndim}-D mesh. "
            "Use fully_shard without shard_placement_fn and without an HSDP (2-D) mesh."
        )
    return mesh


def all_reduce_sum(t: torch.Tensor, mesh) -> torch.Tensor:
    """The sum of ``t`` over the mesh's ranks (a new tensor; ``t`` itself when ``mesh`` is None)."""
    if mesh is None or mesh.size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return out


def gram(A_local: torch.Tensor, mesh) -> torch.Tensor:
    """A^T A (k, k) of a row-sharded A (m, k) from its local rows (m_loc, k): one all-reduce of
    (k, k). The same on every rank."""
    return all_reduce_sum(A_local.mT @ A_local, mesh)


def replicated(t: torch.Tensor, mesh) -> torch.Tensor:
    """``t`` (identical on every rank) as a replicated DTensor on ``mesh``; ``t`` when mesh is None."""
    if mesh is None:
        return t
    DTensor, _, Replicate, _ = _dtensor_types()
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False)


def shard_rows(full: torch.Tensor, mesh) -> torch.Tensor:
    """``full`` (m, ...) (identical on every rank) as a DTensor sharded on dim 0 like an FSDP2
    parameter (each rank keeps its ``torch.chunk`` rows, no communication); ``full`` when mesh is None."""
    if mesh is None:
        return full
    _, _, _, Shard = _dtensor_types()
    return replicated(full, mesh).redistribute(mesh, [Shard(0)])


def from_rows(rows: torch.Tensor, mesh, m: int) -> torch.Tensor:
    """The DTensor (m, ...) sharded on dim 0 whose local shard on this rank is ``rows`` (this rank's
    ``torch.chunk`` rows; no communication); ``rows`` when mesh is None."""
    if mesh is None:
        return rows
    DTensor, _, _, Shard = _dtensor_types()
    shape = torch.Size((m, *rows.shape[1:]))
    return DTensor.from_local(
        rows,
        mesh,
        [Shard(0)],
        run_check=False,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),
    )


def gather_rows(rows: torch.Tensor, mesh, m: int) -> torch.Tensor:
    """The full (m, ...) tensor from every rank's ``torch.chunk`` rows (an all-gather; for the small
    side of a factorization only). ``rows`` itself when mesh is None."""
    if mesh is None:
        return rows
    return from_rows(rows, mesh, m).full_tensor()


def reduce_scatter_rows(partial: torch.Tensor, mesh) -> torch.Tensor:
    """Sum ``partial`` (k, ...) (each rank's share of a sum) over the ranks and keep this rank's
    ``torch.chunk`` rows of the result, as a DTensor sharded on dim 0 (a reduce-scatter).
    ``partial`` itself when mesh is None."""
    if mesh is None:
        return partial
    DTensor, Partial, _, Shard = _dtensor_types()
    return DTensor.from_local(partial, mesh, [Partial()], run_check=False).redistribute(mesh, [Shard(0)])


def is_sharded_module(module: torch.nn.Module) -> bool:
    """True when some parameter of ``module`` is a DTensor (e.g. after ``fully_shard``)."""
    return any(is_dtensor(p) for p in module.parameters())


def _all_gather_stack(t: torch.Tensor, mesh) -> torch.Tensor:
    """(world, *t.shape): every rank's ``t`` (same shape on all ranks), in rank order."""
    parts = [torch.empty_like(t) for _ in range(mesh.size())]
    dist.all_gather(parts, t.contiguous(), group=mesh.get_group())
    return torch.stack(parts)


def qr_rows(Y_local: torch.Tensor, mesh) -> torch.Tensor:
    """An orthonormal basis Q (..., m, L) of the span of a row-sharded Y (..., m, L) (m >= L), returned
    as this rank's rows (..., m_loc, L): TSQR (a Householder QR of the local rows, one of the stacked
    (world L, L) R factors, all-gathered), as stable as a QR of the whole Y. ``torch.linalg.qr(Y).Q``
    when mesh is None. The basis may differ from Y's own QR by an orthogonal (L, L) factor."""
    if mesh is None:
        return torch.linalg.qr(Y_local).Q
    L = Y_local.shape[-1]
    Ql, Rl = torch.linalg.qr(Y_local)  # (..., m_loc, j), (..., j, L), j = min(m_loc, L)
    j = Rl.shape[-2]
    Rl = torch.nn.functional.pad(Rl, (0, 0, 0, L - j))  # zero rows: (..., L, L)
    Ql = torch.nn.functional.pad(Ql, (0, L - j))  # zero columns: (..., m_loc, L)
    stacked = _all_gather_stack(Rl, mesh)  # (world, ..., L, L)
    stacked = stacked.movedim(0, -3).flatten(-3, -2)  # (..., world L, L)
    Qs = torch.linalg.qr(stacked).Q
    me = mesh.get_local_rank()
    return Ql @ Qs[..., me * L : (me + 1) * L, :]


def sign_fixed_rows(X_local: torch.Tensor, mesh, *partners: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`torchlowrank.linalg.sign_fixed` for a row-sharded X (..., m, k) given as this rank's rows:
    each column flipped so that its largest-|entry| component (over all ranks; ties: the first row)
    is positive, the partners' (replicated) columns with it. One all-gather of (..., 1, k); the same
    as ``sign_fixed`` when mesh is None."""
    if X_local.shape[-2]:
        top = torch.gather(X_local, -2, X_local.abs().argmax(dim=-2, keepdim=True))
    else:  # no rows here: a zero never wins against a row of another rank
        top = X_local.new_zeros(*X_local.shape[:-2], 1, X_local.shape[-1])
    tops = top[None] if mesh is None else _all_gather_stack(top, mesh)  # (world, ..., 1, k)
    top = torch.gather(tops, 0, tops.abs().argmax(dim=0, keepdim=True))[0]
    sign = torch.where(top < 0, -1.0, 1.0).to(X_local.dtype)
    return (X_local * sign, *(P * sign for P in partners))
