"""Low-rank factors sharded by rows (FSDP2 ``fully_shard``): what the geometric step needs of them.

Under ``torch.distributed.fsdp.fully_shard`` the parameters of a LowRankLinear / LowRankConv2d are
DTensors sharded on dim 0: every process holds a block of rows of U (m, r) and V (n, r) (and of the
gradients, reduce-scattered: the global batch's mean) and a slice of s (r,). The geometric step
(``manifold_step``) only touches the tall factors through

- row-local products: K = A - U C, Q1 = K L^{-T}, the new bases U (X) + Q1 (Y);
- sums over rows: the small Gram / projection matrices U^T A, K^T K, Q1^T [Q1, K, U] (r x r to
  r x 3r per unit), and X^T X of the every-8-steps re-orthonormalisation.

So the sharded step computes the row-local products on its own rows and all-reduces the small
sums (:meth:`RowSharding.row_sum`, batched over the units of a batch):
Cholesky QR with all-reduced Gram matrices. Everything on the 2r x 2r core is then replicated: every
process computes it from the same all-reduced numbers (an all-reduce returns the same value on every
process), so the bases stay consistent and the rank decisions agree. Nothing is read on the host.

Per group of same-shape layers and step: one all-reduce of U^T A (b, r, r), two for the new
directions of both sides (2b, r, r) and (2b, r, 3r) (``complement_basis_pair``), one to gather s
(b, r); one per step for the finiteness flag.

Supported: U, V sharded on dim 0 (``Shard(0)``) or replicated over each mesh dimension, with at
most one sharded dimension (FSDP, or HSDP's (Replicate, Shard(0))), on one mesh for U, S, V; s may
be sharded (it is gathered: r numbers). Anything else (a sharded rank dimension, ``Shard(1)``)
raises a ValueError naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor: nothing can be sharded
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = ["RowSharding", "row_sharding", "is_dtensor", "local", "gather_vector", "write_vector_"]


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's block of ``t`` (a DTensor's local tensor, sharing its storage), or ``t``."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class RowSharding:
    """Where the rows of a unit's factors live: ``mesh`` and the factor ``placements``; ``dim`` is
    the mesh dimension that shards rows (None: every mesh dimension replicates)."""

    mesh: object
    placements: tuple
    dim: int | None

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The processes holding the other row blocks (None when nothing is sharded)."""
        return None if self.dim is None else self.mesh.get_group(self.dim)

    def key(self) -> tuple:
        """Hashable: units with equal keys can be stepped as one batch."""
        return (id(self.mesh), self.placements)

    def row_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over all rows of a product of row blocks: ``x`` (this process's partial sum)
        all-reduced over the row shards (in place on a contiguous copy; returned)."""
        if self.dim is None:
            return x
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x


def row_sharding(name: str, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> RowSharding | None:
    """The :class:`RowSharding` of a unit's factors, None for plain tensors; ValueError for a layout
    the sharded step cannot take (mixed plain / DTensor factors, different meshes, a sharded rank
    dimension, more than one sharded mesh dimension, partial placements)."""
    kinds = [is_dtensor(t) for t in (U, S, V)]
    if not any(kinds):
        return None
    if not all(kinds):
        raise ValueError(
            f"layer {name!r}: some of U, S, V are DTensors and some are not; shard the whole layer "
            "(fully_shard on the layer or a module containing it) or none of it"
        )
    mesh = U.device_mesh
    if S.device_mesh != mesh or V.device_mesh != mesh:
        raise ValueError(f"layer {name!r}: U, S, V live on different device meshes; use one mesh per layer")
    if U.placements != V.placements:
        raise ValueError(
            f"layer {name!r}: U and V are placed differently ({U.placements} vs {V.placements}); "
            "shard both by rows (Shard(0)) on the same mesh"
        )
    dims = []
    for i, p in enumerate(U.placements):
        if isinstance(p, Shard) and type(p) is Shard and p.dim == 0:
            dims.append(i)
        elif not isinstance(p, Replicate):
            raise ValueError(
                f"layer {name!r}: factor placement {p!r} is not supported by the geometric optimizers: "
                "U (m, r) and V (n, r) must be sharded by rows (Shard(0), fully_shard's default) or "
                "replicated; a sharded rank dimension (Shard(1)) would split the r x r algebra. Use "
                "fully_shard without a shard_placement_fn for low-rank layers"
            )
    if len(dims) > 1:
        raise ValueError(
            f"layer {name!r}: the factor rows are sharded over {len(dims)} mesh dimensions {U.placements}; "
            "one sharded dimension is supported (FSDP, or HSDP's (Replicate(), Shard(0)))"
        )
    s_sharded = [p for p in S.placements if isinstance(p, Shard)]
    if len(s_sharded) > 1 or any(
        not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0) for p in S.placements
    ):
        raise ValueError(
            f"layer {name!r}: S placements {S.placements} are not supported (Shard(0) on at most one "
            "mesh dimension, or Replicate)"
        )
    return RowSharding(mesh, tuple(U.placements), dims[0] if dims else None)


def _offset(t: torch.Tensor) -> int:
    """The global index of the first entry of a 1-D DTensor's local block, Shard(0) on at most one
    mesh dimension (checked by :func:`row_sharding`): ``torch.chunk``'s blocks, as DTensor and FSDP2
    cut them. Python arithmetic on the mesh coordinates (DTensor's own helper reads a tensor)."""
    for i, p in enumerate(t.placements):
        if isinstance(p, Shard):
            n, c = t.device_mesh.size(i), t.device_mesh.get_local_rank(i)
            return min(c * -(-t.shape[0] // n), t.shape[0])
    return 0


def gather_vector(vectors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The full values of 1-D DTensors of one length and one layout, stacked (b, r) in ``dtype``:
    each process writes its slices into zeros and one all-reduce sums them (exact: one nonzero
    addend per entry) -- one collective for the whole batch instead of an all-gather per layer."""
    ref = vectors[0]
    out = torch.zeros(len(vectors), ref.shape[0], dtype=dtype, device=ref.device)
    sharded = [i for i, p in enumerate(ref.placements) if isinstance(p, Shard)]
    if not sharded:
        return torch.stack([local(v) for v in vectors]).to(dtype)
    off = _offset(ref)
    loc = torch.stack([local(v) for v in vectors]).to(dtype)
    out[:, off : off + loc.shape[-1]] = loc
    # only the shard's own coordinate writes the slice once; a replicated mesh dimension would
    # count it several times: divide out by summing over the shard dimension's group only
    dist.all_reduce(out, group=ref.device_mesh.get_group(sharded[0]))
    return out


def write_vector_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write ``full`` (r,) into a 1-D parameter: its local block when it is a DTensor."""
    if not is_dtensor(param):
        param.copy_(full)
        return
    loc = local(param)
    off = _offset(param)
    loc.copy_(full[off : off + loc.shape[0]])
