"""Geometry-aware optimizers for low-rank layers: LowRankSGD (heavy ball) and LowRankAdam (DESIGN §4.5).

Each ``LowRankLinear`` / ``LowRankConv2d`` (W = U diag(s) V^T, U (m, r), V (n, r) orthonormal) is
one geometric unit. One step, from the gradients of one backward pass:

1. Augment: U^ = [U, U1], U1 = orth(G V - U U^T G V) (m, r); V^ = [V, V1] likewise from G^T U.
2. Galerkin: the tangent-space gradient P_T(G) = U U^T G + G V V^T - U U^T G V V^T in the augmented
   basis, G^ = U^^T P_T(G) V^ = [[U^T G V, U^T G V1], [U1^T G V, 0]] (2r, 2r); S^ = [[diag s, 0], [0, 0]].
3. The moments live in coefficient space (r, r); carried into the augmented basis exactly (U^
   starts with U, so the change of basis is a zero padding and the W-space moment is unchanged),
   then updated with G^ (heavy ball, or Adam's two moments).
4. S^ <- S^ - lr * direction.
5. Truncate: S^ = P diag(d) Q^T; keep r1 columns (tau = 0: the current rank; tau > 0: the smallest
   r1 with ||d[r1:]|| <= tau ||d||, clamped to [min_rank, max_rank]); U <- U^ P1, V <- V^ Q1,
   s <- d[:r1], moments <- P1^T M Q1 (second moment: (P1^T sqrt(v) Q1)^2).

How it runs (DESIGN §7): units of the same shape, rank and hyperparameters are stacked and stepped
as one batch (``manifold_step``): the new directions by shifted Cholesky QR (GEMMs), the rank-r
truncation on a GPU by a subspace iteration on the 2r x 2r core warm-started from the kept basis plus
an r x r SVD, on a CPU (and for small cores) by the batched SVD of the core
(``manifold_step.top_triplets``). A fixed-rank step reads no tensor
value on the host. Rank-adaptive steps (tau > 0) read the new ranks of all units once, every
``rank_every`` steps. Non-finite gradients do not raise by default: as ``torch.amp.GradScaler``
does, the step is skipped on the device (factors, moments and other parameters keep their values)
and ``optimizer.nonfinite_steps`` (a device tensor) counts the skipped steps;
``nonfinite="raise"`` restores the host check that names the layer (one sync per step).

G V and G^T U come from the one backward pass: autograd gives dL/dU = G V diag(s) and
dL/dV = G^T U diag(s), and dividing column i by s_i is exact up to rounding (a pure column scaling:
the products were formed with s_i and are divided by the same number). It fails only when s_i is
zero or so small that G V s_i underflows. For layers holding such an s_i (|s_i| < sqrt(tiny) of
the dtype, checked when the optimizer is built, loads a state or changes a rank) the optimizer arms
a probe: forward / tensor hooks record the layer's input and output gradient, and at ``step()``
G V and G^T U are computed from them exactly (a forward + weight backward of that layer with
S = 1). Layers with well-defined s pay nothing.

Distributed: under DDP every process takes the same step from the all-reduced gradients (no
collective at a fixed rank; rank changes: see ``sync_ranks``). Under FSDP2 (``fully_shard``, build the
optimizer afterwards) U and V are DTensors sharded by rows: the step works on this process's rows and
all-reduces the r x r sums over rows it needs (``sharded_factors``: Cholesky QR with all-reduced
Gram matrices); the 2r x 2r core is replicated, the moments are r x r per layer. Rank changes
(tau > 0) need ``reshard=True``: the ranks are decided from the replicated core (and rank 0's
broadcast), identical on every process; FSDP2 cannot resize a sharded parameter, so the resized
layers' new row blocks wait in the optimizer until the documented re-shard point,
:func:`reshard_after_rank_change`, rebuilds the model at the new ranks, shards it as before, writes
every process's own rows into it and re-points the optimizer (same object) at its Parameters.
Checkpoints through ``torch.distributed.checkpoint`` (``get_state_dict`` / ``set_state_dict``) load
on any number of processes.

Every other trainable parameter gets ordinary heavy ball (PyTorch SGD conventions) or AdamW in the
same optimizer. U and V get no weight decay and hold no state of their own; the unit's state
(``rank``, ``step``, the (r, r) moments in the compute dtype) is stored under its U parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from .. import distributed as tlr_dist
from ..layers import LowRankConv2d, LowRankFactors, LowRankLinear
from ..linalg import compute_dtype, sign_fixed
from . import sharded_factors as shf
from .manifold_step import (
    RowSum,
    complement_basis,
    complement_basis_pair,
    galerkin_core,
    tail_ranks,
    top_triplets,
)

__all__ = [
    "LowRankSGD",
    "LowRankAdam",
    "NonFiniteStepError",
    "resize_to_state_dict",
    "lowrank_units",
    "reshard_after_rank_change",
]


class NonFiniteStepError(ValueError):
    """Raised by a step with ``nonfinite="raise"`` when a gradient, or the stepped core of a layer,
    is not finite; nothing was changed."""


def lowrank_units(model: nn.Module) -> list[tuple[str, LowRankFactors]]:
    """``(name, layer)`` for every LowRankLinear / LowRankConv2d of ``model`` with trainable U, S, V."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (LowRankLinear, LowRankConv2d))
        and m.U.requires_grad
        and m.S.requires_grad
        and m.V.requires_grad
    ]


@torch.no_grad()
def resize_to_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Resize the low-rank layers of ``model`` to the ranks stored in a model ``state_dict``.

    Call before ``model.load_state_dict`` when the checkpoint was written after a rank-adaptive
    optimizer changed ranks (the layers get zero factors of the saved shapes; loading fills them).
    """
    for name, layer in model.named_modules():
        if isinstance(layer, LowRankFactors):
            key = f"{name}.S" if name else "S"
            if key in state_dict and state_dict[key].shape[0] != layer.rank:
                k = state_dict[key].shape[0]
                layer.set_factors(
                    layer.U.new_zeros(layer.U.shape[0], k),
                    layer.S.new_zeros(k),
                    layer.V.new_zeros(layer.V.shape[0], k),
                )


def _collect(model_or_params) -> tuple[list[tuple[str, LowRankFactors]], list[tuple[str, nn.Parameter]]]:
    items = [model_or_params] if isinstance(model_or_params, nn.Module) else list(model_or_params)
    units, others, seen = [], [], set()
    for j, item in enumerate(items):
        if isinstance(item, nn.Module):
            prefix = "" if isinstance(model_or_params, nn.Module) else f"[{j}]."
            found = lowrank_units(item)
            for n, m in found:
                units.append((prefix + n if n else prefix.rstrip(".") or type(m).__name__, m))
                seen.update(id(p) for p in (m.U, m.S, m.V))
            for n, p in item.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    others.append((prefix + n, p))
        elif isinstance(item, torch.Tensor):
            if id(item) not in seen:
                seen.add(id(item))
                others.append((f"param[{j}]", item))
        else:
            raise ValueError(
                f"model_or_params must be an nn.Module or an iterable of modules / parameters, got "
                f"an item of type {type(item).__name__}"
            )
    if not units:
        raise ValueError(
            "no trainable LowRankLinear / LowRankConv2d layers found: the geometric optimizers update "
            "U diag(S) V^T factors. Convert the model first (tlr.factorize(model, ...)) or use "
            "torch.optim.AdamW / SGD for a dense model."
        )
    return units, others


def _check_common(
    lr: float,
    weight_decay: float,
    tau: float,
    max_rank: int | None,
    min_rank: int,
    augment_every: int,
    sync_ranks: bool | None,
    rank_every: int,
    nonfinite: str,
) -> None:
    if sync_ranks not in (None, True, False):
        raise ValueError(f"sync_ranks must be None (automatic), True or False, got {sync_ranks!r}")
    for name, k in (("augment_every", augment_every), ("rank_every", rank_every)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{name} must be an int >= 1, got {k!r}")
    if nonfinite not in ("skip", "raise"):
        raise ValueError(
            f"nonfinite must be 'skip' (mask the step on the device) or 'raise', got {nonfinite!r}"
        )
    if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must be in [0, 1) (0 keeps the rank fixed), got {tau!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}")
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < min_rank
    ):
        raise ValueError(f"max_rank must be None or an int >= min_rank ({min_rank}), got {max_rank!r}")


def _reorthonormalize(X: torch.Tensor, row_sum: RowSum = None) -> torch.Tensor:
    """One Newton-Schulz step towards the polar factor: X (I + (I - X^T X) / 2), for X (..., m, k)
    with X^T X = I + E, ||E|| << 1. Leaves an error O(||E||^2): rounding no longer accumulates over steps.
    ``row_sum``: X holds some rows only (FSDP), X^T X is all-reduced."""
    XtX = X.mT @ X
    E = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device) - (XtX if row_sum is None else row_sum(XtX))
    return X + X @ (E * 0.5)


class _Probe:
    """Records (input, output gradient) of a layer whose s has entries too small to divide by."""

    def __init__(self, module: LowRankFactors) -> None:
        self.module = module
        self.records: list[list[torch.Tensor]] = []
        self.handle = module.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        rec = [args[0].detach(), None]
        self.records.append(rec)

        def grad_hook(g: torch.Tensor) -> None:
            rec[1] = g.detach() if rec[1] is None else rec[1] + g.detach()

        output.register_hook(grad_hook)

    def gradients(self, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact (G V (m, r), G^T U (n, r)) summed over the recorded calls, or None if nothing recorded."""
        recs = [(x, g) for x, g in self.records if g is not None]
        if not recs:
            return None
        mod = self.module
        U = mod.U.detach().clone().requires_grad_(True)
        V = mod.V.detach().clone().requires_grad_(True)
        ones = torch.ones_like(mod.S)
        GV = torch.zeros(U.shape, dtype=cd, device=U.device)
        GtU = torch.zeros(V.shape, dtype=cd, device=V.device)
        with torch.enable_grad():
            for x, g in recs:
                y = torch.func.functional_call(mod, {"U": U, "S": ones, "V": V}, (x,))
                gu, gv = torch.autograd.grad(y, (U, V), g)
                GV += gu.to(cd)
                GtU += gv.to(cd)
        return GV, GtU

    def clear(self) -> None:
        self.records = []

    def remove(self) -> None:
        self.handle.remove()
        self.records = []


class _GeometricOptimizer(Optimizer):
    """Shared machinery: units (one param group each: [U, S, V]), other params, probes, state I/O."""

    def __init__(self, model_or_params, defaults: dict, reshard: bool = False) -> None:
        units, others = _collect(model_or_params)
        #: FSDP2 with tau > 0: rank changes wait for :func:`reshard_after_rank_change`
        self._reshard = bool(reshard)
        #: built on one nn.Module (the re-shard point finds the layers by name in a rebuilt model)
        self._from_module = isinstance(model_or_params, nn.Module)
        #: FSDP2: per resized unit, its new factors awaiting the re-shard point: U, V this process's
        #: rows (m_local, k), (n_local, k); s (k,) whole
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name, m in units:
            if defaults["max_rank"] is not None and defaults["max_rank"] < m.rank:
                raise ValueError(
                    f"max_rank={defaults['max_rank']} is below the current rank {m.rank} of layer "
                    f"{name!r}; pass max_rank >= {max(u.rank for _, u in units)} or None"
                )
            if defaults["min_rank"] > min(m.U.shape[0], m.V.shape[0]):
                raise ValueError(f"min_rank={defaults['min_rank']} exceeds the full rank of layer {name!r}")
        groups = [{"params": [m.U, m.S, m.V], "unit": name} for name, m in units]
        if others:
            groups.append({"params": [p for _, p in others], "unit": None})
        super().__init__(groups, defaults)
        self._units: dict[str, LowRankFactors] = {name: m for name, m in units}
        #: per unit, how FSDP2 shards its factors by rows (None: plain tensors)
        self._sharding: dict[str, shf.RowSharding | None] = {
            name: shf.row_sharding(name, m.U, m.S, m.V) for name, m in units
        }
        self._check_sharding(defaults)
        self._param_names = {id(p): n for n, p in others}
        self._probes: dict[str, _Probe] = {}
        self._resized: set[str] = set()  # units whose rank changed at the last step (DDP check)
        #: True when the last ``step()`` changed some layer's rank (new Parameter objects): under DDP,
        #: wrap the model again before the next forward; a compiled model recompiles once; under
        #: FSDP2 (``reshard=True``), call :func:`reshard_after_rank_change` before the next forward.
        self.ranks_changed = False
        #: Steps skipped because a gradient was not finite (a device tensor: read it when logging).
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=units[0][1].U.device)
        for name in self._units:
            self._update_probe(name)

    # ----- FSDP2 ---------------------------------------------------------------------------
    @property
    def _sharded(self) -> bool:
        """Some unit's factors are sharded DTensors (the step all-reduces its sums over rows)."""
        return any(sh is not None for sh in self._sharding.values())

    def _check_sharding(self, defaults: dict) -> None:
        sharded = [n for n, sh in self._sharding.items() if sh is not None]
        if not sharded:
            return
        plain = [n for n, sh in self._sharding.items() if sh is None]
        if plain:
            raise ValueError(
                f"layer(s) {plain} hold plain tensors while {sharded} are sharded (fully_shard): their "
                "gradients would not be reduced over the processes. Apply fully_shard to every low-rank "
                "layer or to a module containing them all (e.g. the root model)"
            )
        if defaults["tau"] > 0 and not self._reshard:
            raise ValueError(
                "rank-adaptive steps (tau > 0) on fully_shard-ed layers need reshard=True: a rank change "
                "replaces the layer's Parameters, which FSDP2 holds in its own sharded storage, so it is "
                "applied at a re-shard point: after a step with optimizer.ranks_changed, call "
                "model = tlr.optim.reshard_after_rank_change(model, optimizer, build, shard) before the "
                "next forward. Or train with tau = 0 under FSDP2, or rank-adaptively under "
                "DistributedDataParallel (wrap again after a step with optimizer.ranks_changed) or one process"
            )

    # ----- probes for near-zero s -----------------------------------------------------------
    @staticmethod
    def _needs_probe(layer: LowRankFactors) -> bool:
        thresh = torch.finfo(layer.S.dtype).tiny ** 0.5
        S = layer.S.detach()
        if shf.is_dtensor(S):
            S = S.full_tensor()
        return bool((S.abs() < thresh).any())

    def _update_probe(self, name: str) -> None:
        layer = self._units[name]
        need = self._needs_probe(layer)
        if need and self._sharding.get(name) is not None:
            raise ValueError(
                f"layer {name!r} has singular values below sqrt(tiny) of its dtype (zero?): G V cannot be "
                "recovered from dL/dU = G V diag(s), and the exact probe is not supported on fully_shard-ed "
                "layers. Re-initialise S (e.g. the layer's reset_parameters) before sharding"
            )
        if need and name not in self._probes:
            self._probes[name] = _Probe(layer)
        elif not need and name in self._probes:
            self._probes.pop(name).remove()

    def _unit_gradients(self, name: str, layer: LowRankFactors, cd: torch.dtype):
        """(G V (m, r), G^T U (n, r)) in the compute dtype, or None when the layer got no gradient.

        Columns whose s_i is too small to divide by get 0, without a host check: the probe (armed
        when the optimizer is built, loads a state or changes a rank) covers layers holding such s_i."""
        probe = self._probes.get(name)
        if probe is not None:
            exact = probe.gradients(cd)
            probe.clear()
            if exact is not None:
                return exact
        gU, gV = layer.U.grad, layer.V.grad
        if gU is None or gV is None:
            return None
        s = layer.S.detach().to(cd)
        safe = s.abs() >= torch.finfo(layer.S.dtype).tiny ** 0.5
        inv = torch.where(safe, 1.0 / torch.where(safe, s, torch.ones_like(s)), torch.zeros_like(s))
        return gU.to(cd) * inv, gV.to(cd) * inv

    # ----- non-finite gradients ----------------------------------------------------------------
    def _finite(self, gathered: list[dict]) -> torch.Tensor | None:
        """A 0-d bool device tensor: every gradient is finite (``GradScaler``'s found_inf, negated),
        from one float64 sum per stacked unit batch and per other parameter (NaN / Inf propagate
        into a sum). With ``nonfinite="raise"`` a non-finite gradient raises here instead (one sync)."""
        sums = [t.sum(dtype=torch.float64) for g in gathered for t in (g["A"], g["B"])]
        sums += [
            shf.local(p.grad).sum(dtype=torch.float64)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and (group["unit"] is None or p is group["params"][1])
        ]
        if self._sharded:  # each process sums its shards: all processes must skip (or raise) together
            total = torch.stack(sums) if sums else self.nonfinite_steps.new_zeros(1, dtype=torch.float64)
            dist.all_reduce(total)
            finite = total.isfinite().all()
        elif not sums:
            return None
        else:
            finite = torch.stack(sums).isfinite().all()
        if self.defaults["nonfinite"] == "raise" and not bool(finite):
            self._raise_nonfinite()
        return finite

    def _raise_nonfinite(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(shf.local(p.grad)).all()):
                    if group["unit"] is not None:
                        layer = self._units[group["unit"]]
                        which = {id(layer.U): "U", id(layer.S): "S", id(layer.V): "V"}[id(p)]
                        where = f"layer {group['unit']!r} (factor {which})"
                    else:
                        where = f"parameter {self._param_names.get(id(p), '?')!r}"
                    raise NonFiniteStepError(
                        f"non-finite gradient in {where}: step refused, no weight was changed. "
                        "Lower the learning rate, check the loss, or use gradient clipping."
                    )
        if self._sharded:  # the non-finite entries are in another process's shard
            raise NonFiniteStepError(
                "non-finite gradient in another process's shard: step refused, no weight was changed. "
                "Lower the learning rate, check the loss, or use gradient clipping."
            )

    # ----- the common geometric step ----------------------------------------------------------
    def _batches(self) -> list[list[dict]]:
        """Units with a gradient, grouped so that a batch shares shapes, dtype, device,
        hyperparameters and step count: its algebra runs as one stack (bmm, batched QR)."""
        out: dict[tuple, list[dict]] = {}
        for group in self.param_groups:
            name = group["unit"]
            if name is None:
                continue
            layer = self._units[name]
            if layer.U.grad is None and name not in self._probes:
                continue
            hyper = tuple((k, v) for k, v in sorted(group.items()) if k not in ("params", "unit"))
            sh = self._sharding.get(name)
            key = (
                None if sh is None else sh.key(),
                tuple(layer.U.shape),
                tuple(layer.V.shape),
                layer.U.dtype,
                layer.U.device,
                self.state[layer.U].get("step", 0),
                hyper,
            )
            out.setdefault(key, []).append(group)
        return list(out.values())

    @torch.no_grad()
    def _gather(self, groups: list[dict]) -> dict | None:
        """The stacked factors and gradients of a batch of same-shape units (None if none got a
        gradient): U (b, m, r), V (b, n, r), s (b, r), A = G V (b, m, r), B = G^T U (b, n, r)."""
        layers = [self._units[g["unit"]] for g in groups]
        cd = compute_dtype(layers[0].U.dtype)
        sh = self._sharding.get(groups[0]["unit"])
        if sh is not None:
            return self._gather_sharded(groups, layers, cd, sh)
        grads = [self._unit_gradients(g["unit"], layer, cd) for g, layer in zip(groups, layers)]
        have = [i for i, gr in enumerate(grads) if gr is not None]
        if not have:
            return None
        groups, layers, grads = [groups[i] for i in have], [layers[i] for i in have], [grads[i] for i in have]
        return dict(
            groups=groups,
            layers=layers,
            cd=cd,
            A=torch.stack([a for a, _ in grads]),
            B=torch.stack([b for _, b in grads]),
            U=torch.stack([layer.U.detach() for layer in layers]).to(cd),
            V=torch.stack([layer.V.detach() for layer in layers]).to(cd),
            s=torch.stack([layer.S.detach() for layer in layers]).to(cd),
            row_sum=None,
            sharding=None,
        )

    @torch.no_grad()
    def _gather_sharded(
        self, groups: list[dict], layers: list, cd: torch.dtype, sh: shf.RowSharding
    ) -> dict | None:
        """:meth:`_gather` for row-sharded factors: U (b, m_local, r), V (b, n_local, r), A, B this
        process's rows (of the reduce-scattered, global-batch gradients), s (b, r) whole (gathered,
        one collective). No probe here (refused for sharded layers)."""
        have = [i for i, layer in enumerate(layers) if layer.U.grad is not None and layer.V.grad is not None]
        if not have:
            return None
        groups, layers = [groups[i] for i in have], [layers[i] for i in have]
        s = shf.gather_vector([layer.S.detach() for layer in layers], cd)  # (b, r)
        tiny = torch.finfo(layers[0].S.dtype).tiny ** 0.5
        safe = s.abs() >= tiny
        inv = torch.where(safe, 1.0 / torch.where(safe, s, torch.ones_like(s)), torch.zeros_like(s))[
            :, None, :
        ]
        return dict(
            groups=groups,
            layers=layers,
            cd=cd,
            A=torch.stack([shf.local(layer.U.grad).to(cd) for layer in layers]) * inv,
            B=torch.stack([shf.local(layer.V.grad).to(cd) for layer in layers]) * inv,
            U=torch.stack([shf.local(layer.U.detach()) for layer in layers]).to(cd),
            V=torch.stack([shf.local(layer.V.detach()) for layer in layers]).to(cd),
            s=s,
            row_sum=sh.row_sum,
            sharding=sh,
        )

    @torch.no_grad()
    def _stepped_batch(self, batch: dict, finite: torch.Tensor | None) -> dict:
        """Steps 1-4 and the core's decomposition for a batch of same-shape units (:meth:`_gather`)."""
        groups, layers, U, V, s, A, B = (batch[k] for k in ("groups", "layers", "U", "V", "s", "A", "B"))
        group = groups[0]
        if finite is not None:  # a skipped step still runs (no host branch): keep its algebra finite
            A, B = torch.where(finite, A, 0.0), torch.where(finite, B, 0.0)
        states = [self.state[layer.U] for layer in layers]
        step, r = states[0].get("step", 0) + 1, U.shape[-1]  # written to the states when applied
        # augment at steps 1, 1 + k, 1 + 2k, ...; in between a Galerkin step in the current basis (S-step)
        augment = (step - 1) % group["augment_every"] == 0
        row_sum = batch["row_sum"]  # FSDP: the sums over rows are all-reduced, the rest is replicated
        C = U.mT @ A  # U^T G V (b, r, r)
        if row_sum is not None:
            C = row_sum(C)
        if augment:
            if row_sum is None:
                U1, TU, EU, RU, keep_u = complement_basis(U, A, C)
                V1, TV, EV, RV, keep_v = complement_basis(V, B, C.mT)
            else:  # both sides in one stack: two all-reduces instead of four
                (U1, TU, EU, RU, keep_u), (V1, TV, EV, RV, keep_v) = complement_basis_pair(
                    U, A, V, B, C, row_sum
                )
            G_hat = galerkin_core(C, RU, RV)
            S_hat = torch.diag_embed(torch.cat([s, torch.zeros_like(s)], -1))
            ones = torch.ones_like(keep_u)
            free = torch.cat([ones, keep_u], -1)[:, :, None] * torch.cat([ones, keep_v], -1)[:, None, :]
            free[:, r:, r:] = 0  # the new-new block of a tangent vector is zero
        else:
            U1 = V1 = TU = TV = EU = EV = None
            G_hat, S_hat, free = C, torch.diag_embed(s), torch.ones_like(C)
        unstepped = S_hat
        S_hat, moments = self._direction(group, states, G_hat, S_hat, r, free, step)
        # a step so large that the core overflows is refused like a non-finite gradient
        ok = torch.isfinite(S_hat).all()
        if self.defaults["nonfinite"] == "raise" and not bool(ok):
            raise NonFiniteStepError(
                f"the stepped core of layer(s) {[g['unit'] for g in groups]} is not finite: the step "
                f"overflowed (lr {group['lr']:g} too large?). Step refused, no weight was changed."
            )
        ok = ok if finite is None else ok & finite
        S_hat = torch.where(ok, S_hat, unstepped)
        ranks = None
        if (
            group["tau"] > 0 and step % group["rank_every"] == 0
        ):  # the whole spectrum: the rank may grow to 2r
            Pm, d, Qh = torch.linalg.svd(S_hat)
            P, Q = sign_fixed(Pm, Qh.mT)
            full = min(layers[0].U.shape[0], layers[0].V.shape[0])  # global rows (U: local ones if sharded)
            hi = min(full, group["max_rank"] if group["max_rank"] is not None else full, d.shape[-1])
            ranks = tail_ranks(d, group["tau"], group["min_rank"], hi)
            ranks = torch.where(ok, ranks, torch.full_like(ranks, r))  # a skipped step keeps its rank
        else:
            P, d, Q = top_triplets(S_hat, r)
        return dict(
            groups=groups,
            layers=layers,
            states=states,
            U=U,
            V=V,
            U1=U1,
            V1=V1,
            TU=TU,
            TV=TV,
            EU=EU,
            EV=EV,
            P=P,
            d=d,
            Q=Q,
            s=s,
            moments=moments,
            ranks=ranks,
            r=r,
            step=step,
            ok=ok,
            row_sum=row_sum,
            sharding=batch["sharding"],
        )

    @torch.no_grad()
    def _apply_batch(self, core: dict, ranks: list[int] | None) -> None:
        """Step 5: keep r1 directions of each stepped core; new factors and transported moments.
        A skipped step (the core's ``ok`` flag False) keeps factors and moments as they were: its
        P is replaced by the identity and d by s, so the products below reproduce them exactly."""
        r, ok, states = core["r"], core["ok"], core["states"]
        P, Q, d = core["P"], core["Q"], core["d"]
        if ranks is None or all(k == r for k in ranks):  # the common case: one batched update
            P, Q, d = P[..., :r], Q[..., :r], d[..., :r]
            eye_p = torch.eye(P.shape[1], r, dtype=P.dtype, device=P.device)
            eye_q = torch.eye(Q.shape[1], r, dtype=Q.dtype, device=Q.device)
            P, Q = torch.where(ok, P, eye_p), torch.where(ok, Q, eye_q)
            d = torch.where(ok, d, core["s"])
            U_new, V_new = self._new_bases(core, P, Q, r)
            if core["step"] % 8 == 0:  # rounding drift is ~eps per step: correct it now and then
                U_new = torch.where(ok, _reorthonormalize(U_new, core["row_sum"]), U_new)
                V_new = torch.where(ok, _reorthonormalize(V_new, core["row_sum"]), V_new)
            moments = {key: self._transported(M, kind, P, Q) for key, (M, kind) in core["moments"].items()}
            for key, new in moments.items():
                if key in states[0] and states[0][key].shape == new.shape[1:]:
                    moments[key] = torch.where(ok, new, torch.stack([st[key] for st in states]))
            for i, (layer, state) in enumerate(zip(core["layers"], states)):
                state["rank"], state["step"] = r, core["step"]
                for key, new in moments.items():
                    state[key] = new[i]
                self._empty_factor_states(layer)
                self._write_factors(layer, core["sharding"], U_new[i], d[i], V_new[i])
            return
        for i, (group, layer, state) in enumerate(zip(core["groups"], core["layers"], states)):
            r1 = ranks[i]  # a rank decision step: ranks differ per layer (ok False keeps r)
            P1, Q1 = P[i : i + 1, :, :r1], Q[i : i + 1, :, :r1]
            U_new, V_new = self._new_bases(core, P1, Q1, r, i)
            if core["step"] % 8 == 0:
                U_new = _reorthonormalize(U_new, core["row_sum"])
                V_new = _reorthonormalize(V_new, core["row_sum"])
            for key, (M, kind) in core["moments"].items():
                state[key] = self._transported(M[i : i + 1], kind, P1, Q1)[0]
            state["rank"], state["step"] = r1, core["step"]
            if r1 != r and core["sharding"] is not None:  # FSDP2: applied at the re-shard point
                self._pending[group["unit"]] = (U_new[0].clone(), d[i, :r1].clone(), V_new[0].clone())
                self._empty_factor_states(layer)
                self.ranks_changed = True
                continue
            self._write_factors(layer, core["sharding"], U_new[0], d[i, :r1], V_new[0])
            self._empty_factor_states(layer)
            if r1 != r:
                self.ranks_changed = True
                self._resized.add(group["unit"])
                self._rebind(group, layer)
                self._update_probe(group["unit"])

    def _empty_factor_states(self, layer: LowRankFactors) -> None:
        """An empty state under S and V (the unit's state lives under U): distributed checkpoints
        (``torch.distributed.checkpoint.state_dict``, strict by default) expect a state entry for
        every trainable parameter once the optimizer has stepped."""
        for p in (layer.S, layer.V):
            if p not in self.state:
                self.state[p] = {}

    @staticmethod
    def _write_factors(
        layer: LowRankFactors,
        sharding: shf.RowSharding | None,
        U: torch.Tensor,
        s: torch.Tensor,
        V: torch.Tensor,
    ) -> None:
        """The new factors into the layer: U (m, k), s (k,), V (n, k); sharded (FSDP2): U, V this
        process's rows, s whole, written into the local shards in place (same rank only)."""
        if sharding is None:
            layer.set_factors(U, s, V)
            return
        if s.shape[0] != layer.S.shape[0]:  # unreachable: a sharded rank change waits in _pending
            raise ValueError(
                "a rank change of a fully_shard-ed layer is applied by reshard_after_rank_change"
            )
        shf.local(layer.U).copy_(U)
        shf.write_vector_(layer.S, s)
        shf.local(layer.V).copy_(V)

    @staticmethod
    def _new_bases(
        core: dict, P: torch.Tensor, Q: torch.Tensor, r: int, i: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[U, U1] P and [V, V1] Q for a stack (or unit ``i``), with U1 = Q1 T - U E (the complement
        basis): U (P_top - E P_bottom) + Q1 (T P_bottom), no pass over a formed U1."""
        pick = (lambda t: t) if i is None else (lambda t: t[i : i + 1])
        U, V = pick(core["U"]), pick(core["V"])
        if core["U1"] is None:
            return U @ P, V @ Q
        U_new = torch.baddbmm(
            pick(core["U1"]) @ (pick(core["TU"]) @ P[:, r:]),
            U,
            torch.baddbmm(P[:, :r], pick(core["EU"]), P[:, r:], alpha=-1),
        )
        V_new = torch.baddbmm(
            pick(core["V1"]) @ (pick(core["TV"]) @ Q[:, r:]),
            V,
            torch.baddbmm(Q[:, :r], pick(core["EV"]), Q[:, r:], alpha=-1),
        )
        return U_new, V_new

    @staticmethod
    def _transported(M: torch.Tensor, kind: str, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """A stack of coefficient-space moments (b, p, q) in the kept bases: P^T M Q (b, k, k)."""
        if kind == "sqrt":  # second moment: transport its square root, square again
            return (P.mT @ M.sqrt() @ Q) ** 2
        if kind == "linear":
            return P.mT @ M @ Q
        return M.clone()  # one number per layer, invariant under the change of basis

    def _step_units(self, closure: Callable | None) -> tuple[Any, list[dict], torch.Tensor | None]:
        """The part of ``step`` shared by SGD and Adam: the closure, re-binding layers resized from
        outside (resize_to_state_dict), the finiteness flag, and the geometric step of every unit.
        Returns (loss, the groups of ordinary parameters, the finiteness flag or None).

        Host synchronisations: none at a fixed rank (tau = 0, and tau > 0 between rank decisions);
        one on a rank decision step (the new ranks of all units, read together, under DDP after
        rank 0's broadcast); and the check ``nonfinite="raise"`` asks for."""
        self._check_no_pending("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["unit"] is not None:
                layer = self._units[group["unit"]]
                if shf.is_dtensor(layer.U) != (self._sharding[group["unit"]] is not None):
                    raise ValueError(
                        f"layer {group['unit']!r} was sharded (fully_shard) or unsharded after the optimizer "
                        "was built: its Parameters are new objects. Build the optimizer after fully_shard, "
                        "as for any torch optimizer"
                    )
                self._rebind(group, layer)
        gathered = [g for g in (self._gather(b) for b in self._batches()) if g is not None]
        finite = self._finite(gathered)
        if finite is not None:
            self.nonfinite_steps = self.nonfinite_steps + (~finite).to(torch.int64)
        if self._resized and self._syncs_ranks():
            self._check_replicas_after_rank_change()
        cores = [self._stepped_batch(g, finite) for g in gathered]
        decided = [c for c in cores if c["ranks"] is not None]
        ranks: list[list[int] | None] = [None] * len(cores)
        if decided:
            values = self._agree_on_ranks(torch.cat([c["ranks"] for c in decided]))
            for j, c in enumerate(cores):
                if c["ranks"] is not None:
                    ranks[j], values = values[: len(c["groups"])], values[len(c["groups"]) :]
        self.ranks_changed = False
        for core, rk in zip(cores, ranks):
            self._apply_batch(core, rk)
        return loss, [g for g in self.param_groups if g["unit"] is None], finite

    @staticmethod
    def _stack_moment(
        states: list[dict], key: str, shape: tuple[int, int], r: int, like: torch.Tensor
    ) -> torch.Tensor:
        """The units' (r, r) moments in the augmented basis [U, U1] x [V, V1]: zero padding (b, p, q)."""
        out = torch.zeros((len(states), *shape), dtype=like.dtype, device=like.device)
        if key in states[0]:
            out[:, :r, :r] = torch.stack([st[key] for st in states])
        return out

    def _syncs_ranks(self) -> bool:
        return self.defaults["sync_ranks"] is not False and tlr_dist.is_distributed()

    def _agree_on_ranks(
        self, proposed: torch.Tensor | list[int], device: torch.device | None = None
    ) -> list[int]:
        """The proposed ranks as Python ints: the one synchronisation of a rank decision step.
        Under DDP rank 0's decisions (one broadcast): the gradients DDP all-reduces are the same on
        every rank, so the decisions already agree up to each process's rounding; the broadcast makes
        them agree exactly, so the factor shapes (and DDP's buckets) can never differ."""
        t = torch.as_tensor(proposed, dtype=torch.int64, device=device)
        if self._syncs_ranks():
            tlr_dist.broadcast_tensors_([t])
        return t.tolist()

    def _rebind(self, group: dict, layer: LowRankFactors) -> None:
        """After a rank change the layer holds new Parameter objects: point the group and state at them."""
        old_U = group["params"][0]
        if old_U is layer.U:
            return
        old_S, old_V = group["params"][1:]
        group["params"] = [layer.U, layer.S, layer.V]
        for old, new in ((old_U, layer.U), (old_S, layer.S), (old_V, layer.V)):
            if old in self.state:
                self.state[new] = self.state.pop(old)

    def _check_replicas_after_rank_change(self) -> None:
        """After a rank change under DDP, the layer holds new Parameters that an existing DDP wrapper
        does not know: their gradients are not all-reduced and the replicas would drift apart (and
        DDP fails one step later with an unrelated message). One all-reduce of the resized units'
        gradient sums, on the first step after a change only, catches it before anything changes."""
        # in the units' order: a set's order depends on each process's hash seed
        names = [n for n in self._units if n in self._resized and self._units[n].U.grad is not None]
        self._resized = set()
        if not names:
            return
        sums = torch.stack(
            [
                torch.stack(
                    [
                        p.grad.detach().double().sum()
                        for p in (self._units[n].U, self._units[n].S, self._units[n].V)
                    ]
                )
                for n in names
            ]
        )
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(
                f"the gradients of layer(s) {names} differ between processes after their rank changed: the "
                "DistributedDataParallel wrapper was built before the change and does not all-reduce the new "
                "factors. After a step with `optimizer.ranks_changed`, wrap the model again "
                "(`ddp = DistributedDataParallel(model, ...)`) before the next forward. Step refused, no "
                "weight was changed."
            )

    # ----- state I/O -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state written by ``state_dict()``; resizes the low-rank layers to the saved ranks.

        The layers' factors are only resized here (to zeros when the rank differs); load the
        model's own state dict after this (or call ``resize_to_state_dict`` first).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)
        ):
            raise ValueError("state_dict does not match this optimizer's parameter groups (different model?)")
        saved_state = state_dict["state"]
        with torch.no_grad():
            for group, saved in zip(self.param_groups, saved_groups):
                if group["unit"] is None:
                    continue
                st = saved_state.get(saved["params"][0])
                layer = self._units[group["unit"]]
                if st is not None and st["rank"] != layer.rank:
                    if self._sharding.get(group["unit"]) is not None:
                        raise ValueError(
                            f"the state holds rank {st['rank']} for layer {group['unit']!r}, rank "
                            f"{layer.rank} here, and a fully_shard-ed layer cannot be resized: build "
                            "the model at the saved ranks (resize_to_state_dict) before fully_shard"
                        )
                    k = st["rank"]
                    layer.set_factors(
                        layer.U.new_zeros(layer.U.shape[0], k),
                        layer.S.new_zeros(k),
                        layer.V.new_zeros(layer.V.shape[0], k),
                    )
                if group["params"][0] is not layer.U:  # resized here or by resize_to_state_dict
                    self._rebind(group, layer)
        super().load_state_dict(state_dict)
        for group, saved in zip(self.param_groups, saved_groups):
            if group["unit"] is None:
                continue
            U = group["params"][0]
            st = saved_state.get(saved["params"][0])
            if st is not None:  # keep the moments in the compute dtype (the base class casts to U's dtype)
                cd = compute_dtype(U.dtype)
                self.state[U] = {
                    k: (v.detach().to(device=U.device, dtype=cd).clone() if torch.is_tensor(v) else v)
                    for k, v in st.items()
                }
        for name in self._units:
            self._update_probe(name)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (exact count, not process memory)."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )

    def remove_hooks(self) -> None:
        """Detach the probes' hooks from the model (call when the optimizer is discarded)."""
        for probe in self._probes.values():
            probe.remove()
        self._probes = {}

    # ----- FSDP2 rank changes: the re-shard point ------------------------------------------------
    @property
    def pending_ranks(self) -> dict[str, int]:
        """FSDP2 with ``reshard=True``: the new rank of every layer whose rank change awaits
        :func:`reshard_after_rank_change` (empty otherwise)."""
        return {name: s.shape[0] for name, (_, s, _) in self._pending.items()}

    def _check_no_pending(self, what: str) -> None:
        if self._pending:
            raise ValueError(
                f"{what} refused: the rank of fully_shard-ed layer(s) {sorted(self._pending)} changed at the "
                f"last step (new ranks {self.pending_ranks}) and the model still holds the old factors. "
                "Call model = tlr.optim.reshard_after_rank_change(model, optimizer, build, shard) after a "
                "step with optimizer.ranks_changed, before the next forward"
            )

    def state_dict(self) -> dict:
        """The optimizer's state (``torch.optim.Optimizer.state_dict``); refused while an FSDP2 rank
        change awaits the re-shard point (its moments would not match the model's factors)."""
        self._check_no_pending("state_dict()")
        return super().state_dict()

    @torch.no_grad()
    def _adopt(self, model: nn.Module) -> None:
        """Point the parameter groups and the state at ``model``'s Parameters (a rebuilt copy of the
        model this optimizer was built on: same layer and parameter names, the pending ranks)."""
        units, others = _collect(model)
        new_units, new_others = dict(units), dict(others)
        for group in self.param_groups:
            if group["unit"] is not None:
                layer = new_units[group["unit"]]
                new_params = [layer.U, layer.S, layer.V]
            else:
                new_params = [new_others[self._param_names[id(p)]] for p in group["params"]]
            for old, new in zip(group["params"], new_params):
                if old not in self.state:
                    continue
                st = self.state.pop(old)
                for k, v in st.items():
                    if shf.is_dtensor(v) and v.shape == new.shape:  # per-element state: new's layout
                        moved = torch.zeros_like(new, dtype=v.dtype)
                        shf.local(moved).copy_(shf.local(v))
                        st[k] = moved
                self.state[new] = st
            group["params"] = new_params
        self._units = new_units
        self._sharding = {name: shf.row_sharding(name, m.U, m.S, m.V) for name, m in units}
        self._check_sharding(self.defaults)
        self._param_names = {id(p): n for n, p in others}
        self.remove_hooks()
        self._pending = {}
        self._resized = set()
        for name in self._units:
            self._update_probe(name)


@torch.no_grad()
def reshard_after_rank_change(
    model: nn.Module,
    optimizer: _GeometricOptimizer,
    build: Callable[[], nn.Module],
    shard: Callable[[nn.Module], nn.Module | None],
) -> nn.Module:
    """The re-shard point of rank-adaptive training under FSDP2: apply the rank changes of the last
    ``optimizer.step()`` by rebuilding the model. Returns the model to train from now on.

    FSDP2 keeps each parameter in its own sharded storage and a module cannot be ``fully_shard``-ed
    twice, so a layer whose rank changed cannot be resized in place. With ``reshard=True``, a rank
    decision step of ``LowRankSGD`` / ``LowRankAdam`` on ``fully_shard``-ed layers decides the new
    ranks from the replicated core (identical on every process), transports the moments, and keeps
    the resized layers' new row blocks in the optimizer (``optimizer.pending_ranks``;
    ``optimizer.ranks_changed`` is True). Call this then, on every process, before the next forward::

        model = shard(build())
        opt = tlr.optim.LowRankAdam(model, tau=0.05, reshard=True)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            if opt.ranks_changed:
                model = tlr.optim.reshard_after_rank_change(model, opt, build, shard)

    It (1) calls ``build()`` for a fresh, unsharded model of the same architecture (its values and
    ranks do not matter), (2) resizes its low-rank layers to the current ranks, (3) calls
    ``shard(model)``, which must apply ``fully_shard`` exactly as for the original (same meshes and
    wrapping: every parameter keeps its row split, which depends on the rows only, not the rank),
    (4) copies every process's own rows of every parameter and every buffer from ``model`` (the
    resized layers from the optimizer: U, V rows and s), and (5) re-points ``optimizer`` (the same
    object: learning-rate schedulers keep working) at the new Parameters with its state carried
    over. No collective and no full gather: each process writes only its rows; the result equals
    the one-process rank-adaptive run. Gradients are not carried (call it after ``step()``).

    Without a pending rank change (unsharded models apply theirs inside ``step()``) it returns
    ``model`` unchanged. ``ValueError`` when the optimizer was not built on ``model`` (one module),
    or when the rebuilt model's names or row blocks differ from ``model``'s (another architecture,
    another wrapping).
    """
    if not isinstance(optimizer, _GeometricOptimizer):
        raise ValueError(f"optimizer must be a LowRankSGD / LowRankAdam, got {type(optimizer).__name__}")
    if not optimizer._pending:
        return model
    units, _ = _collect(model)
    if not optimizer._from_module or dict(units).keys() != optimizer._units.keys():
        raise ValueError(
            "reshard_after_rank_change needs the optimizer built on this model (one nn.Module, the one "
            "passed here): the rebuilt model's layers are found by name"
        )
    if any(optimizer._units[name] is not layer for name, layer in units):
        raise ValueError("the optimizer was not built on this model (its low-rank layers are other objects)")
    fresh = build()
    trained = dict(model.named_parameters())
    for key, p in fresh.named_parameters():  # frozen as in the trained model (FSDP2 keeps the flag)
        if key in trained:
            p.requires_grad_(trained[key].requires_grad)
    fresh_units, _ = _collect(fresh)
    if dict(fresh_units).keys() != optimizer._units.keys():
        raise ValueError(
            f"build() returned a model with low-rank layers {sorted(dict(fresh_units))}, the optimizer "
            f"trains {sorted(optimizer._units)}: build the same architecture"
        )
    ranks = {name: layer.rank for name, layer in units} | optimizer.pending_ranks
    for name, layer in fresh_units:
        old = optimizer._units[name]
        if (layer.U.shape[0], layer.V.shape[0]) != (old.U.shape[0], old.V.shape[0]):
            raise ValueError(
                f"build(): layer {name!r} has factors of {layer.U.shape[0]} x {layer.V.shape[0]} rows, "
                f"the trained one {old.U.shape[0]} x {old.V.shape[0]}"
            )
        k = ranks[name]
        if layer.rank != k:
            layer.set_factors(
                layer.U.new_zeros(layer.U.shape[0], k),
                layer.S.new_zeros(k),
                layer.V.new_zeros(layer.V.shape[0], k),
            )
    sharded = shard(fresh)
    fresh = fresh if sharded is None else sharded
    # every process writes its own rows: the pending factors of the resized layers, the rest as is
    source = {key: p.detach() for key, p in trained.items()}
    whole = set()  # the resized layers' s (k,): whole, each process writes its slice
    for name, (U, s, V) in optimizer._pending.items():
        prefix = next(n for n, m in model.named_modules() if m is optimizer._units[name])
        prefix = f"{prefix}." if prefix else ""
        source[prefix + "U"], source[prefix + "S"], source[prefix + "V"] = U, s, V
        whole.add(prefix + "S")
    targets = dict(fresh.named_parameters())
    if targets.keys() != source.keys():
        raise ValueError(
            f"build() / shard(): the rebuilt model's parameters {sorted(targets.keys() ^ source.keys())} "
            "differ from the trained model's: build the same architecture"
        )
    for key, target in targets.items():
        if key in whole:
            shf.write_vector_(target, source[key])
            continue
        src_local, dst_local = shf.local(source[key]), shf.local(target)
        if src_local.shape != dst_local.shape:
            raise ValueError(
                f"shard(): parameter {key!r} holds a block of {tuple(dst_local.shape)} on this process, "
                f"the trained model {tuple(src_local.shape)}: shard the rebuilt model as the original "
                "(same fully_shard calls and meshes)"
            )
        dst_local.copy_(src_local)
    buffers = dict(model.named_buffers())
    for key, target in fresh.named_buffers():
        if key not in buffers or buffers[key].shape != target.shape:
            raise ValueError(f"build(): buffer {key!r} differs from the trained model's")
        shf.local(target).copy_(shf.local(buffers[key]))
    optimizer._adopt(fresh)
    return fresh


SECOND_MOMENTS = ("unit", "elementwise", "elementwise_mean", "elementwise_reset")


def _scale_basis_blocks(D: torch.Tensor, r: int, ratio: float) -> torch.Tensor:
    """D (b, p, q) with its off-diagonal blocks D[:, :r, r:], D[:, r:, :r] scaled by ``ratio``."""
    scale = torch.full_like(D[0], ratio)
    scale[:r, :r] = 1.0
    scale[r:, r:] = 1.0
    return D * scale


def _masked_copy_(finite: torch.Tensor | None, target: torch.Tensor, new: torch.Tensor) -> None:
    """target <- new, or unchanged where the step is skipped (``finite`` False)."""
    target.copy_(new if finite is None else torch.where(finite, new, target))


class LowRankSGD(_GeometricOptimizer):
    """Heavy ball on the manifold of rank-r matrices for LowRankLinear / LowRankConv2d layers.

    Args:
        model_or_params: a model, or an iterable of modules / parameters; its LowRankLinear /
            LowRankConv2d layers are the geometric units, every other trainable parameter gets
            ``torch.optim.SGD``'s update (same momentum, nesterov, weight decay conventions).
        lr: step size (> 0). momentum: heavy-ball coefficient in [0, 1), buffer b <- momentum b + g
            (first step b = g). nesterov: use g + momentum b. weight_decay: L2 (added to G; for a unit
            it is wd * W, whose tangent projection is wd * W).
        tau: 0 keeps each layer's rank; in (0, 1) drops the smallest singular values of the stepped
            2r x 2r core with tail norm <= tau * total norm (rank adaptive, clamped to
            [min_rank, max_rank]). max_rank: None (full rank) or >= every layer's current rank.
        rank_every: with tau > 0, decide ranks at every ``rank_every``-th step (one host
            synchronisation each); the steps in between keep the rank.
        augment_every: k = 1 augments the basis every step; k > 1 augments at steps 1, k + 1, ... and
            in between takes the Galerkin step in the current basis (S <- S - lr U^T G V direction,
            re-diagonalised by an r x r SVD), as the reference DLRT trainers do: cheaper steps that
            can only keep or shrink the rank.
        nonfinite: ``"skip"`` (default): a step with a NaN / Inf gradient changes nothing, decided on
            the device (no synchronisation; ``optimizer.nonfinite_steps`` counts them);
            ``"raise"``: a ValueError naming the layer, before anything changes (one sync per step).
        sync_ranks: under ``torch.distributed`` (DDP) with tau > 0, rank 0's rank decisions are
            broadcast to every process (a few ints), so the replicas keep the same shapes. None
            (default): whenever a process group of > 1 processes is initialised; False: never. A
            rank change replaces the layer's Parameters: when ``optimizer.ranks_changed`` is True
            after ``step()``, wrap the model in DistributedDataParallel again before the next
            forward (the next step raises a RuntimeError if the gradients of a resized layer were
            not all-reduced). With tau = 0 the optimizers add no collective under DDP.
            FSDP2 (``fully_shard``-ed layers, the optimizer built after wrapping): each step
            all-reduces a few r x r (to r x 3r) sums over the sharded rows per group of same-shape
            layers, and its result equals one process on the global batch.
        reshard: FSDP2 with tau > 0 (refused without it): a rank decision is taken from the
            replicated core, identical on every process, and applied at a re-shard point: when
            ``optimizer.ranks_changed`` is True after ``step()`` (``optimizer.pending_ranks``: the
            new ranks), call ``model = tlr.optim.reshard_after_rank_change(model, optimizer, build,
            shard)`` before the next forward; it rebuilds and re-shards the model at the new ranks
            and re-points this optimizer at it. Until then ``step()`` and ``state_dict()`` raise a
            ValueError. No effect on unsharded layers (their rank changes apply inside ``step()``).

    Momentum lives in coefficient space (r, r per layer): W-space momentum U C V^T.
    """

    def __init__(
        self,
        model_or_params,
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = False,
        tau: float = 0.0,
        max_rank: int | None = None,
        min_rank: int = 1,
        weight_decay: float = 0.0,
        augment_every: int = 1,
        rank_every: int = 1,
        nonfinite: str = "skip",
        sync_ranks: bool | None = None,
        reshard: bool = False,
    ) -> None:
        _check_common(
            lr, weight_decay, tau, max_rank, min_rank, augment_every, sync_ranks, rank_every, nonfinite
        )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(
            model_or_params,
            dict(
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                tau=tau,
                max_rank=max_rank,
                min_rank=min_rank,
                weight_decay=weight_decay,
                augment_every=augment_every,
                rank_every=rank_every,
                nonfinite=nonfinite,
                sync_ranks=sync_ranks,
            ),
            reshard=reshard,
        )

    def _direction(self, group, states, G_hat, S_hat, r, free, step):
        """S^ - lr * heavy-ball direction, for stacks G_hat, S_hat (b, p, q)."""
        if group["weight_decay"]:
            G_hat = G_hat + group["weight_decay"] * S_hat
        if not group["momentum"]:
            return S_hat - group["lr"] * G_hat, {}
        if "momentum_buffer" in states[0]:
            buf = self._stack_moment(states, "momentum_buffer", G_hat.shape[1:], r, G_hat)
            buf = buf.mul_(group["momentum"]).add_(G_hat)
        else:
            buf = G_hat.clone()
        d = G_hat + group["momentum"] * buf if group["nesterov"] else buf
        return S_hat - group["lr"] * d, {"momentum_buffer": (buf, "linear")}

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss, plain_groups, finite = self._step_units(closure)
        for group in plain_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if group["momentum"]:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = (
                            torch.zeros_like(p) if finite is not None else g.detach().clone()
                        )
                        _masked_copy_(finite, st["momentum_buffer"], g)
                    else:
                        _masked_copy_(
                            finite, st["momentum_buffer"], st["momentum_buffer"] * group["momentum"] + g
                        )
                    buf = st["momentum_buffer"]
                    g = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                _masked_copy_(finite, p, p - group["lr"] * g)
        return loss


class LowRankAdam(_GeometricOptimizer):
    """Adam on the manifold of rank-r matrices for LowRankLinear / LowRankConv2d layers.

    Args as :class:`LowRankSGD`; betas, eps as ``torch.optim.AdamW``; weight_decay is decoupled
    (AdamW): other parameters p <- p (1 - lr wd), a unit's W <- W (1 - lr wd) (on its S; U, V are
    not decayed). The unit's first moment (r, r) is carried exactly into each new basis.

    second_moment: how Adam's second moment lives in the changing bases (the ablation
    ``geometric-ablation`` compares them):

    - ``"unit"`` (default): one second moment per layer, the running mean square of the
      coefficient gradient G^ over its free entries (as Adam-mini does per block). Invariant under
      the basis changes of every step, so it needs no transport.
    - ``"elementwise"``: DESIGN §4.5 literally, an (r, r) second moment carried by its square
      root; the new rows / columns of each augmentation start at 0, so their first steps have
      size ~lr whatever their gradient.
    - ``"elementwise_mean"``: carried like ``"elementwise"``, but the new entries of each
      augmentation start at the layer's mean carried second moment instead of 0.
    - ``"elementwise_reset"``: elementwise, not carried: re-started from G^ * G^ at each
      augmentation.

    basis_lr_ratio: scales the step of the off-diagonal blocks of the augmented core (the basis
    update, U1^T G V and U^T G V1) relative to the Galerkin (S) block; 1 is the method as derived.

    Defaults (lr 3e-2, ``second_moment="unit"``, ``basis_lr_ratio=3``, betas (0.9, 0.95)) are the
    ones the ablations found to work. ``geometric-ablation`` (docs/geometric-ablation.md): with one
    second moment per layer the best learning rate is ~10x Adam's usual 1e-3, and the basis blocks
    want a larger step than the S block; with them LowRankAdam matches Adam on the A B^T factors on
    Fashion-MNIST (0.808 vs 0.805) and beats it on digits (0.951 vs 0.926) at equal parameters. The
    ``lowrank-lm`` ablation (docs/lowrank-lm.md): beta2 = 0.999 keeps one layer's second moment
    averaged over ~1000 steps, and on a byte-level Llama that cost 0.066 of LowRankAdam's 0.076
    nats/byte gap to factorized AdamW; beta2 = 0.95 ties 0.999 on digits and Fashion-MNIST
    (``scripts/geometric_beta2.py``).
    """

    def __init__(
        self,
        model_or_params,
        lr: float = 3e-2,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        tau: float = 0.0,
        max_rank: int | None = None,
        min_rank: int = 1,
        second_moment: str = "unit",
        augment_every: int = 1,
        rank_every: int = 1,
        basis_lr_ratio: float = 3.0,
        nonfinite: str = "skip",
        sync_ranks: bool | None = None,
        reshard: bool = False,
    ) -> None:
        _check_common(
            lr, weight_decay, tau, max_rank, min_rank, augment_every, sync_ranks, rank_every, nonfinite
        )
        if second_moment not in SECOND_MOMENTS:
            raise ValueError(f"second_moment must be one of {SECOND_MOMENTS}, got {second_moment!r}")
        if not (
            isinstance(basis_lr_ratio, (int, float)) and basis_lr_ratio >= 0 and math.isfinite(basis_lr_ratio)
        ):
            raise ValueError(f"basis_lr_ratio must be a finite number >= 0, got {basis_lr_ratio!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        super().__init__(
            model_or_params,
            dict(
                lr=lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
                tau=tau,
                max_rank=max_rank,
                min_rank=min_rank,
                second_moment=second_moment,
                augment_every=augment_every,
                rank_every=rank_every,
                basis_lr_ratio=basis_lr_ratio,
                nonfinite=nonfinite,
                sync_ranks=sync_ranks,
            ),
            reshard=reshard,
        )

    def _direction(self, group, states, G_hat, S_hat, r, free, step):
        """S^ (1 - lr wd) - lr * Adam direction, for stacks G_hat, S_hat (b, p, q); ``free`` (b, p, q)
        marks the entries of G^ that are not structurally zero."""
        b1, b2 = group["betas"]
        t = step
        shape = G_hat.shape[1:]
        m = self._stack_moment(states, "exp_avg", shape, r, G_hat).mul_(b1).add_(G_hat, alpha=1 - b1)
        kind, augmented = group["second_moment"], G_hat.shape[-1] > r
        if kind == "unit":
            # one second moment per layer: the mean square of the coefficient gradient over its free
            # entries, invariant under the basis rotations of every step (so it needs no transport)
            old = torch.stack([st["exp_avg_sq"] for st in states]) if "exp_avg_sq" in states[0] else 0.0
            mean_sq = G_hat.pow(2).sum((-2, -1)) / free.sum((-2, -1))
            v = b2 * old + (1 - b2) * mean_sq  # (b,)
            moments = {"exp_avg": (m, "linear"), "exp_avg_sq": (v, "scalar")}
            v = v[:, None, None]
        elif kind == "elementwise_reset" and augmented:
            # restarted from this gradient alone: v = G^ * G^ is its own bias-corrected estimate
            v = G_hat * G_hat
            moments = {"exp_avg": (m, "linear"), "exp_avg_sq": (v, "sqrt")}
            v = v * (1 - b2**t)  # so that the common bias correction below leaves it as it is
        else:
            v = self._stack_moment(states, "exp_avg_sq", shape, r, G_hat)
            if kind == "elementwise_mean" and augmented and "exp_avg_sq" in states[0]:
                mean = v[:, :r, :r].mean((-2, -1), keepdim=True)
                new_entries = torch.ones_like(v)
                new_entries[:, :r, :r] = 0
                v = v + mean * new_entries * free
            v = v.mul_(b2).addcmul_(G_hat, G_hat, value=1 - b2)
            moments = {"exp_avg": (m, "linear"), "exp_avg_sq": (v, "sqrt")}
        denom = (v / (1 - b2**t)).sqrt().add(group["eps"])
        D = (m / (1 - b1**t)) / denom
        if augmented and group["basis_lr_ratio"] != 1.0:
            D = _scale_basis_blocks(D, r, group["basis_lr_ratio"])
        S_hat = S_hat * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * D
        return S_hat, moments

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss, plain_groups, finite = self._step_units(closure)
        for group in plain_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                t = st["step"]
                m = st["exp_avg"].lerp(p.grad, 1 - b1)
                v = st["exp_avg_sq"] * b2 + (1 - b2) * p.grad * p.grad
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                new = (p * (1 - group["lr"] * group["weight_decay"])).addcdiv_(
                    m, denom, value=-group["lr"] / (1 - b1**t)
                )
                _masked_copy_(finite, st["exp_avg"], m)
                _masked_copy_(finite, st["exp_avg_sq"], v)
                _masked_copy_(finite, p, new)
        return loss
