"""Geometry-aware optimizers for low-rank layers: LowRankSGD (heavy ball) and LowRankAdam (DESIGN §4.5).

Each ``LowRankLinear`` / ``LowRankConv2d`` (W = U diag(s) V^T, U (m, r), V (n, r) orthonormal) is
one geometric unit. One step, from the gradients of one backward pass:

1. Augment: U^ = [U, orth(G V - U U^T G V)] (m, p), V^ = [V, orth(G^T U - V V^T G^T U)] (n, q),
   p, q <= 2r.
2. Galerkin: the tangent-space gradient P_T(G) = U U^T G + G V V^T - U U^T G V V^T in the augmented
   basis, G^ = U^^T P_T(G) V^ = [[U^T G V, (G^T U)^T V1], [U1^T G V, 0]] (p, q); S^ = [[diag s, 0], [0, 0]].
3. The moments live in coefficient space (r, r); carried into the augmented basis exactly (U^
   starts with U, so the change of basis is a zero padding and the W-space moment is unchanged),
   then updated with G^ (heavy ball, or Adam's two moments).
4. S^ <- S^ - lr * direction.
5. Truncate: S^ = P diag(d) Q^T; keep r1 columns (tau = 0: the current rank; tau > 0: the smallest
   r1 with ||d[r1:]|| <= tau ||d||, clamped to [min_rank, max_rank]); U <- U^ P1, V <- V^ Q1,
   s <- d[:r1], moments <- P1^T M Q1 (second moment: (P1^T sqrt(v) Q1)^2).

G V and G^T U come from the one backward pass: autograd gives dL/dU = G V diag(s) and
dL/dV = G^T U diag(s), and dividing column i by s_i is exact up to rounding (a pure column scaling:
the products were formed with s_i and are divided by the same number). It fails only when s_i is
zero or so small that G V s_i underflows. For layers holding such an s_i (|s_i| < sqrt(tiny) of
the dtype) the optimizer arms a probe: forward / tensor hooks record the layer's input and output
gradient, and at ``step()`` G V and G^T U are computed from them exactly (a forward + weight
backward of that layer with S = 1). Layers with well-defined s pay nothing.

Every other trainable parameter gets ordinary heavy ball (PyTorch SGD conventions) or AdamW in the
same optimizer. U and V get no weight decay and hold no state of their own; the unit's state
(``rank``, ``step``, the (r, r) moments in the compute dtype) is stored under its U parameter.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from .. import distributed as tlr_dist
from ..layers import LowRankConv2d, LowRankLinear, _LowRankFactors
from ..linalg import compute_dtype, robust_svd

__all__ = ["LowRankSGD", "LowRankAdam", "resize_to_state_dict", "lowrank_units"]


def lowrank_units(model: nn.Module) -> list[tuple[str, _LowRankFactors]]:
    """``(name, layer)`` for every LowRankLinear / LowRankConv2d of ``model`` with trainable U, S, V."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (LowRankLinear, LowRankConv2d)) and m.U.requires_grad and m.S.requires_grad
            and m.V.requires_grad]


@torch.no_grad()
def resize_to_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Resize the low-rank layers of ``model`` to the ranks stored in a model ``state_dict``.

    Call before ``model.load_state_dict`` when the checkpoint was written after a rank-adaptive
    optimizer changed ranks (the layers get zero factors of the saved shapes; loading fills them).
    """
    for name, layer in model.named_modules():
        if isinstance(layer, _LowRankFactors):
            key = f"{name}.S" if name else "S"
            if key in state_dict and state_dict[key].shape[0] != layer.rank:
                k = state_dict[key].shape[0]
                layer.set_factors(layer.U.new_zeros(layer.U.shape[0], k), layer.S.new_zeros(k),
                                  layer.V.new_zeros(layer.V.shape[0], k))


def _collect(model_or_params) -> tuple[list[tuple[str, _LowRankFactors]], list[tuple[str, nn.Parameter]]]:
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
            raise ValueError(f"model_or_params must be an nn.Module or an iterable of modules / parameters, got "
                             f"an item of type {type(item).__name__}")
    if not units:
        raise ValueError("no trainable LowRankLinear / LowRankConv2d layers found: the geometric optimizers update "
                         "U diag(S) V^T factors. Convert the model first (tlr.factorize(model, ...)) or use "
                         "torch.optim.AdamW / SGD for a dense model.")
    return units, others


def _check_common(lr: float, weight_decay: float, tau: float, max_rank: int | None, min_rank: int,
                  augment_every: int, sync_ranks: bool | None) -> None:
    if sync_ranks not in (None, True, False):
        raise ValueError(f"sync_ranks must be None (automatic), True or False, got {sync_ranks!r}")
    if isinstance(augment_every, bool) or not isinstance(augment_every, int) or augment_every < 1:
        raise ValueError(f"augment_every must be an int >= 1, got {augment_every!r}")
    if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must be in [0, 1) (0 keeps the rank fixed), got {tau!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < min_rank):
        raise ValueError(f"max_rank must be None or an int >= min_rank ({min_rank}), got {max_rank!r}")


def _cholesky_qr(K: torch.Tensor, KtK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(Q, L) with K = Q L^T, Q (m, k) orthonormal, by Cholesky QR (GEMMs only), or None if K is
    (numerically) rank deficient and the caller must take the Householder path. ``KtK``: K^T K if
    the caller has it."""
    L, info = torch.linalg.cholesky_ex(K.T @ K if KtK is None else KtK)
    if int(info) != 0:
        return None
    d = torch.diagonal(L)
    if not bool(d.min() > d.max() * 10 * torch.finfo(K.dtype).eps ** 0.5):  # cond(K) < ~1 / (10 sqrt(eps))
        return None
    # K L^{-T} as a GEMM with the small inverse (a tall triangular solve is several times slower)
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return K @ torch.linalg.solve_triangular(L.T, eye, upper=True), L


def _complement(U: torch.Tensor, A: torch.Tensor, k: int, UtA: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, R): k orthonormal columns Q (m, k) orthogonal to U (m, r) with span([U, Q]) containing
    span(A) (A: (m, r)), and R = Q^T A (k, r). ``UtA``: U^T A if the caller has it."""
    if k == 0:
        return U[:, :0], A[:0]
    if k < A.shape[1]:  # m < 2r: the augmented basis is all of R^m
        Q = torch.linalg.qr(U, mode="complete").Q[:, U.shape[1]:]
        return Q, Q.T @ A
    C = U.T @ A if UtA is None else UtA
    K = A - U @ C
    KtK = K.T @ K
    # a second Gram-Schmidt pass unless every column kept half its norm ("twice is enough", Kahan);
    # ||A_i||^2 = ||C_i||^2 + ||K_i||^2 (U orthonormal), so the norms come from the small matrices
    kept = torch.diagonal(KtK)
    if not bool((kept > 0.25 * (kept + (C * C).sum(0))).all()):
        K = K - U @ (U.T @ K)
        KtK = None
    first = _cholesky_qr(K, KtK)
    second = _cholesky_qr(first[0]) if first is not None else None  # CholeskyQR2
    if second is not None:
        # K = Q L2^T L1^T and A = U (.) + K with Q orthogonal to U: Q^T A = (L1 L2)^T, no product with A
        return second[0], (first[1] @ second[1]).T
    Q = torch.linalg.qr(K).Q
    # columns of Q for (near) zero columns of K are arbitrary; make them orthogonal to U as well
    Q = Q - U @ (U.T @ Q)
    Q = torch.linalg.qr(Q).Q
    return Q, Q.T @ A


def _reorthonormalize(X: torch.Tensor) -> torch.Tensor:
    """One Newton-Schulz step towards the polar factor: X (I + (I - X^T X) / 2), for X (m, k) with
    X^T X = I + E, ||E|| << 1. Leaves an error O(||E||^2): rounding no longer accumulates over steps."""
    E = torch.eye(X.shape[1], dtype=X.dtype, device=X.device) - X.T @ X
    return X + X @ (E * 0.5)


class _Probe:
    """Records (input, output gradient) of a layer whose s has entries too small to divide by."""

    def __init__(self, module: _LowRankFactors) -> None:
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

    _unit_state_keys: tuple[str, ...] = ()

    def __init__(self, model_or_params, defaults: dict) -> None:
        units, others = _collect(model_or_params)
        for name, m in units:
            if defaults["max_rank"] is not None and defaults["max_rank"] < m.rank:
                raise ValueError(f"max_rank={defaults['max_rank']} is below the current rank {m.rank} of layer "
                                 f"{name!r}; pass max_rank >= {max(u.rank for _, u in units)} or None")
            if defaults["min_rank"] > min(m.U.shape[0], m.V.shape[0]):
                raise ValueError(f"min_rank={defaults['min_rank']} exceeds the full rank of layer {name!r}")
        groups = [{"params": [m.U, m.S, m.V], "unit": name} for name, m in units]
        if others:
            groups.append({"params": [p for _, p in others], "unit": None})
        super().__init__(groups, defaults)
        self._units: dict[str, _LowRankFactors] = {name: m for name, m in units}
        self._param_names = {id(p): n for n, p in others}
        self._probes: dict[str, _Probe] = {}
        self._resized: set[str] = set()  # units whose rank changed at the last step (DDP check)
        #: True when the last ``step()`` changed some layer's rank (new Parameter objects): under DDP,
        #: wrap the model again before the next forward; a compiled model recompiles once.
        self.ranks_changed = False
        for name in self._units:
            self._update_probe(name)

    # ----- probes for near-zero s -----------------------------------------------------------
    @staticmethod
    def _needs_probe(layer: _LowRankFactors) -> bool:
        thresh = torch.finfo(layer.S.dtype).tiny ** 0.5
        return bool((layer.S.detach().abs() < thresh).any())

    def _update_probe(self, name: str) -> None:
        layer = self._units[name]
        need = self._needs_probe(layer)
        if need and name not in self._probes:
            self._probes[name] = _Probe(layer)
        elif not need and name in self._probes:
            self._probes.pop(name).remove()

    def _unit_gradients(self, name: str, layer: _LowRankFactors, cd: torch.dtype):
        """(G V (m, r), G^T U (n, r)) in the compute dtype, or None when the layer got no gradient."""
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
        if not bool(safe.all()):
            warnings.warn(f"layer {name!r} has singular values too small to recover G V from dL/dU = G V diag(S) "
                          "and no recorded forward pass (the optimizer was created after it); those columns are "
                          "treated as 0 for this step", RuntimeWarning, stacklevel=3)
        inv = torch.where(safe, 1.0 / torch.where(safe, s, torch.ones_like(s)), torch.zeros_like(s))
        return gU.to(cd) * inv, gV.to(cd) * inv

    def _check_gradients(self) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        # fast path: one reduction per tensor and one sync (NaN / Inf propagate into the sums)
        if bool(torch.isfinite(torch.stack([g.sum().float() for g in grads])).all()):
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    if group["unit"] is not None:
                        which = {id(self._units[group["unit"]].U): "U", id(self._units[group["unit"]].S): "S",
                                 id(self._units[group["unit"]].V): "V"}[id(p)]
                        where = f"layer {group['unit']!r} (factor {which})"
                    else:
                        where = f"parameter {self._param_names.get(id(p), '?')!r}"
                    raise ValueError(f"non-finite gradient in {where}: step refused, no weight was changed. "
                                     "Lower the learning rate, check the loss, or use gradient clipping.")

    # ----- the common geometric step ----------------------------------------------------------
    def _choose_rank(self, d: torch.Tensor, r: int, group: dict, full: int) -> int:
        hi = min(full, group["max_rank"] if group["max_rank"] is not None else full)
        if group["tau"] == 0:
            return min(r, d.numel())
        # tail[k] = ||d[k:]||; the smallest k with tail[k] <= tau ||d||
        tail = torch.flip(torch.cumsum(torch.flip(d.double() ** 2, [0]), 0), [0]).sqrt()
        tail = torch.cat([tail, tail.new_zeros(1)])
        ok = (tail <= group["tau"] * tail[0]).nonzero()
        r1 = int(ok[0]) if ok.numel() else d.numel()
        return max(group["min_rank"], min(r1, hi, d.numel()))

    @torch.no_grad()
    def _stepped_core(self, group: dict, direction: Callable) -> dict | None:
        """Steps 1-4 and the SVD of step 5 for one unit: everything up to the rank decision.
        Returns what :meth:`_apply_rank` needs, or None when the layer got no gradient."""
        name = group["unit"]
        layer = self._units[name]
        cd = compute_dtype(layer.U.dtype)
        grads = self._unit_gradients(name, layer, cd)
        if grads is None:
            return None
        A, B = grads  # G V (m, r), G^T U (n, r)
        U, s, V = layer.U.detach().to(cd), layer.S.detach().to(cd), layer.V.detach().to(cd)
        m, r = U.shape
        n = V.shape[0]
        state = self.state[layer.U]
        if not state:
            state["rank"] = r
            state["step"] = 0
        state["step"] += 1
        # augment at steps 1, 1 + k, 1 + 2k, ...; in between a Galerkin step in the current basis (S-step)
        augment = (state["step"] - 1) % group["augment_every"] == 0
        ku, kv = (min(r, m - r), min(r, n - r)) if augment else (0, 0)
        UtA = U.T @ A  # U^T G V (r, r)
        (U1, RU), (V1, RV) = _complement(U, A, ku, UtA), _complement(V, B, kv)
        p, q = r + ku, r + kv
        G_hat = torch.zeros(p, q, dtype=cd, device=U.device)
        G_hat[:r, :r] = UtA
        if augment:
            G_hat[r:, :r] = RU  # U1^T G V
            G_hat[:r, r:] = RV.T  # U^T G V1 = (V1^T G^T U)^T
        S_hat = torch.zeros(p, q, dtype=cd, device=U.device)
        S_hat[:r, :r] = torch.diag(s)
        S_hat, moments = direction(group, state, G_hat, S_hat, r, (p, q), p * q - ku * kv)
        P, d, Qh = robust_svd(S_hat)
        return dict(U=U, V=V, U1=U1, V1=V1, P=P, d=d, Qh=Qh, moments=moments, cd=cd,
                    rank=self._choose_rank(d, r, group, min(m, n)))

    @torch.no_grad()
    def _apply_rank(self, group: dict, core: dict, r1: int) -> None:
        """Step 5: keep r1 directions of the stepped core; new factors and transported moments."""
        name = group["unit"]
        layer = self._units[name]
        state = self.state[layer.U]
        U, V, cd, r = core["U"], core["V"], core["cd"], core["U"].shape[1]
        P1, Q1 = core["P"][:, :r1].to(cd), core["Qh"][:r1].T.to(cd)
        for key, (M, kind) in core["moments"].items():
            if kind == "sqrt":  # second moment: transport its square root, square again
                state[key] = (P1.T @ M.sqrt() @ Q1) ** 2
            else:
                state[key] = P1.T @ M @ Q1
        state["rank"] = r1
        U_new = torch.addmm(core["U1"] @ P1[r:], U, P1[:r])  # [U, U1] P1
        V_new = torch.addmm(core["V1"] @ Q1[r:], V, Q1[:r])
        if state["step"] % 8 == 0:  # rounding drift is ~eps per step: correct it now and then
            U_new, V_new = _reorthonormalize(U_new), _reorthonormalize(V_new)
        layer.set_factors(U_new, core["d"][:r1].to(cd), V_new)
        self._rebind(group, layer)
        self._update_probe(name)

    def _syncs_ranks(self) -> bool:
        return self.defaults["sync_ranks"] is not False and tlr_dist.is_distributed()

    def _agree_on_ranks(self, proposed: list[int], device: torch.device) -> list[int]:
        """Rank 0's rank decisions on every process (one broadcast of a few ints per step, only when
        some unit is rank adaptive). The gradients DDP all-reduces are the same on every rank, so the
        decisions already agree up to the rounding of each process's SVD; the broadcast makes them
        agree exactly, so the factor shapes (and DDP's buckets) can never differ between ranks."""
        t = torch.tensor(proposed, dtype=torch.int64, device=device)
        tlr_dist.broadcast_tensors_([t])
        return [int(k) for k in t.tolist()]

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
        sums = torch.stack([torch.stack([p.grad.detach().double().sum() for p in
                                         (self._units[n].U, self._units[n].S, self._units[n].V)]) for n in names])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(
                f"the gradients of layer(s) {names} differ between processes after their rank changed: the "
                "DistributedDataParallel wrapper was built before the change and does not all-reduce the new "
                "factors. After a step with `optimizer.ranks_changed`, wrap the model again "
                "(`ddp = DistributedDataParallel(model, ...)`) before the next forward. Step refused, no "
                "weight was changed.")

    def _step_units(self, closure: Callable | None) -> tuple[Any, list[dict]]:
        """The part of ``step`` shared by SGD and Adam: the closure, re-binding layers resized from
        outside (resize_to_state_dict), the NaN check (before anything changes), and the geometric
        step of every unit. Returns (loss, the groups of ordinary parameters)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["unit"] is not None:
                self._rebind(group, self._units[group["unit"]])
        self._check_gradients()
        if self._resized and self._syncs_ranks():
            self._check_replicas_after_rank_change()
        plain, cores = [], []
        for group in self.param_groups:
            if group["unit"] is not None:
                core = self._stepped_core(group, self._direction)
                if core is not None:
                    cores.append((group, core))
            else:
                plain.append(group)
        ranks = [core["rank"] for _, core in cores]
        if cores and self._syncs_ranks() and any(g["tau"] > 0 for g, _ in cores):
            ranks = self._agree_on_ranks(ranks, cores[0][1]["d"].device)
        self.ranks_changed = False
        for (group, core), r1 in zip(cores, ranks):
            if r1 != core["U"].shape[1]:
                self.ranks_changed = True
                self._resized.add(group["unit"])
            self._apply_rank(group, core, r1)
        return loss, plain

    def _rebind(self, group: dict, layer: _LowRankFactors) -> None:
        """After a rank change the layer holds new Parameter objects: point the group and state at them."""
        old_U = group["params"][0]
        if old_U is layer.U:
            return
        group["params"] = [layer.U, layer.S, layer.V]
        for old in (old_U,):
            if old in self.state:
                self.state[layer.U] = self.state.pop(old)

    @staticmethod
    def _pad(M: torch.Tensor | None, shape: tuple[int, int], r: int, like: torch.Tensor) -> torch.Tensor:
        """A coefficient-space moment (r, r) in the augmented basis [U, U1] x [V, V1]: zero padding."""
        out = torch.zeros(shape, dtype=like.dtype, device=like.device)
        if M is not None:
            out[:r, :r] = M
        return out

    # ----- state I/O -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state written by ``state_dict()``; resizes the low-rank layers to the saved ranks.

        The layers' factors are only resized here (to zeros when the rank differs); load the
        model's own state dict after this (or call ``resize_to_state_dict`` first).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            raise ValueError("state_dict does not match this optimizer's parameter groups (different model?)")
        saved_state = state_dict["state"]
        with torch.no_grad():
            for group, saved in zip(self.param_groups, saved_groups):
                if group["unit"] is None:
                    continue
                st = saved_state.get(saved["params"][0])
                layer = self._units[group["unit"]]
                if st is not None and st["rank"] != layer.rank:
                    k = st["rank"]
                    layer.set_factors(layer.U.new_zeros(layer.U.shape[0], k), layer.S.new_zeros(k),
                                      layer.V.new_zeros(layer.V.shape[0], k))
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
                self.state[U] = {k: (v.detach().to(device=U.device, dtype=cd).clone() if torch.is_tensor(v) else v)
                                 for k, v in st.items()}
        for name in self._units:
            self._update_probe(name)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (exact count, not process memory)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if torch.is_tensor(v))

    def remove_hooks(self) -> None:
        """Detach the probes' hooks from the model (call when the optimizer is discarded)."""
        for probe in self._probes.values():
            probe.remove()
        self._probes = {}


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
        augment_every: k = 1 augments the basis every step; k > 1 augments at steps 1, k + 1, ... and
            in between takes the Galerkin step in the current basis (S <- S - lr U^T G V direction,
            re-diagonalised by an r x r SVD), as the reference DLRT trainers do: cheaper steps that
            can only keep or shrink the rank.
        sync_ranks: under ``torch.distributed`` (DDP) with tau > 0, rank 0's rank decisions are
            broadcast to every process at each step (a few ints), so the replicas keep the same
            shapes. None (default): whenever a process group of > 1 processes is initialised;
            False: never (each process trains its own model). A rank change replaces the layer's
            Parameters: when ``optimizer.ranks_changed`` is True after ``step()``, wrap the model
            in DistributedDataParallel again before the next forward (the next step raises a
            RuntimeError if the gradients of a resized layer were not all-reduced). With tau = 0
            the optimizers add no collective: every process takes the same step from DDP's
            all-reduced gradients.

    Momentum lives in coefficient space (r, r per layer): W-space momentum U C V^T.
    """

    def __init__(self, model_or_params, lr: float, momentum: float = 0.9, nesterov: bool = False, tau: float = 0.0,
                 max_rank: int | None = None, min_rank: int = 1, weight_decay: float = 0.0,
                 augment_every: int = 1, sync_ranks: bool | None = None) -> None:
        _check_common(lr, weight_decay, tau, max_rank, min_rank, augment_every, sync_ranks)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(model_or_params, dict(lr=lr, momentum=momentum, nesterov=nesterov, tau=tau,
                                               max_rank=max_rank, min_rank=min_rank, weight_decay=weight_decay,
                                               augment_every=augment_every, sync_ranks=sync_ranks))

    @staticmethod
    def _direction(group, state, G_hat, S_hat, r, shape, n_free):
        if group["weight_decay"]:
            G_hat = G_hat + group["weight_decay"] * S_hat
        moments = {}
        if group["momentum"]:
            old = state.get("momentum_buffer")
            buf = G_hat.clone() if old is None else group["momentum"] * _GeometricOptimizer._pad(old, shape, r, G_hat) + G_hat
            d = G_hat + group["momentum"] * buf if group["nesterov"] else buf
            moments["momentum_buffer"] = (buf, "linear")
        else:
            d = G_hat
        return S_hat - group["lr"] * d, moments

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss, plain_groups = self._step_units(closure)
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
                        st["momentum_buffer"] = g.detach().clone()
                    else:
                        st["momentum_buffer"].mul_(group["momentum"]).add_(g)
                    buf = st["momentum_buffer"]
                    g = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.add_(g, alpha=-group["lr"])
        return loss


class LowRankAdam(_GeometricOptimizer):
    """Adam on the manifold of rank-r matrices for LowRankLinear / LowRankConv2d layers.

    Args as :class:`LowRankSGD`; betas, eps as ``torch.optim.AdamW``; weight_decay is decoupled
    (AdamW): other parameters p <- p (1 - lr wd), a unit's W <- W (1 - lr wd) (on its S; U, V are
    not decayed). The unit's first moment (r, r) is carried exactly into each new basis.

    second_moment: ``"unit"`` (default) keeps one second moment per layer, the running mean square
    of the coefficient gradient G^ (as Adam-mini does per block). It is invariant under the basis
    changes of every step, so the step does not depend on the arbitrary coordinates of the
    augmented basis. ``"elementwise"`` is DESIGN §4.5 literally: an (r, r) second moment carried by
    its square root; the new rows / columns of each augmentation start at 0, and the per-entry
    normalisation then blows tiny cross-block gradients up to steps of size lr — measured unstable
    on the geometry-toy problems (see docs/optim.md), kept for comparison.
    """

    def __init__(self, model_or_params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, tau: float = 0.0, max_rank: int | None = None,
                 min_rank: int = 1, second_moment: str = "unit", augment_every: int = 1,
                 sync_ranks: bool | None = None) -> None:
        _check_common(lr, weight_decay, tau, max_rank, min_rank, augment_every, sync_ranks)
        if second_moment not in ("unit", "elementwise"):
            raise ValueError(f"second_moment must be 'unit' or 'elementwise', got {second_moment!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        super().__init__(model_or_params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, tau=tau,
                                               max_rank=max_rank, min_rank=min_rank, second_moment=second_moment,
                                               augment_every=augment_every, sync_ranks=sync_ranks))

    @staticmethod
    def _direction(group, state, G_hat, S_hat, r, shape, n_free):
        b1, b2 = group["betas"]
        t = state["step"]
        m = _GeometricOptimizer._pad(state.get("exp_avg"), shape, r, G_hat).mul_(b1).add_(G_hat, alpha=1 - b1)
        if group["second_moment"] == "unit":
            # one second moment per layer: the mean square of the coefficient gradient, invariant under
            # the basis rotations of every step (so it needs no transport)
            old = state.get("exp_avg_sq")
            # (mean over the entries that are not structurally zero: the new-new block of G^ is)
            v = (old.to(G_hat.dtype) * b2 if old is not None else 0.0) + (1 - b2) * G_hat.pow(2).sum() / n_free
            moments = {"exp_avg": (m, "linear")}
            state["exp_avg_sq"] = v
        else:
            v = _GeometricOptimizer._pad(state.get("exp_avg_sq"), shape, r, G_hat).mul_(b2).addcmul_(G_hat, G_hat, value=1 - b2)
            moments = {"exp_avg": (m, "linear"), "exp_avg_sq": (v, "sqrt")}
        denom = (v / (1 - b2 ** t)).sqrt().add(group["eps"])
        S_hat = S_hat * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * (m / (1 - b1 ** t)) / denom
        return S_hat, moments

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss, plain_groups = self._step_units(closure)
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
                p.mul_(1 - group["lr"] * group["weight_decay"])
                st["exp_avg"].lerp_(p.grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t))
        return loss
