"""``SpectrumTracker``: spectra and ranks of weights, updates and gradients during training.

Call order (one line in a training loop)::

    tracker = tlr.SpectrumTracker(model, every=50)   # records the step-0 weights now
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        tracker.step()          # after backward (and the optimizer step), before the next zero_grad

or ``tracker.attach(optimizer)`` once, which calls ``step()`` from an optimizer step post-hook
(the gradients of that step are still in ``.grad`` then). ``step()`` counts optimizer steps; at
every multiple of ``every`` it records, for each targeted layer and each tracked quantity

- ``"weight"``: W (out, in) — conv kernels reshaped to (out, in * kh * kw);
- ``"update"``: W - W0, W0 the weight when the tracker was built;
- ``"grad"``:   dLoss/dW as left in ``W.grad`` by the last backward (the gradient of the step just taken;
  only for layers whose weight is a parameter, not for factorized layers' ``dense_weight()``),

one row: top singular values, Frobenius and spectral norm, stable / effective / numerical rank, and
the largest principal angle between the current top-k left (and right) singular subspace and the
reference one: the first recorded value of that quantity (the step-0 weight; the first recorded
update / gradient, since W - W0 = 0 and no gradient exist at step 0).

Spectrum policy: stable rank needs only ||W||_F and s_1, but effective and numerical ranks need every
singular value. Layers whose smaller side is at most ``full_spectrum_max`` (default 1024) get a full
thin SVD (exact everything); larger layers get a truncated SVD of rank ``top_k`` only: the stable rank
stays exact (the Frobenius norm is computed directly), the numerical rank is exact when the top-k
values already hold ``energy`` of the squared norm (else ``None``), and the effective rank is ``None``.

Memory: tracking ``"update"`` keeps a copy of every tracked weight at step 0 (in float32 / float64).

The tracker never changes training: it reads detached copies under ``torch.no_grad()``, never writes
to parameters or gradients, and draws no numbers from the global random generators (the randomized
SVD uses its own seeded generator).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..files import atomic_write_text, read_json
from ..layer_types import check_not_meta, matrix_view
from ..linalg import compute_dtype, robust_svd, truncated_svd
from ..ranks import as_matrix, layer_weight, weight_layers
from ..results import Plot, Table, jsonable
from ..targets import Targets

__all__ = [
    "SpectrumTracker",
    "QUANTITIES",
    "HISTORY_COLUMNS",
    "analyse_matrix",
    "max_principal_angle",
    "load_history",
]

QUANTITIES = ("weight", "update", "grad")
HISTORY_COLUMNS = [
    "step",
    "layer",
    "quantity",
    "rows",
    "cols",
    "full_rank",
    "spectrum",
    "fro_norm",
    "spectral_norm",
    "stable_rank",
    "effective_rank",
    "numerical_rank",
    "angle_left",
    "angle_right",
    "top_singular_values",
]


def _nan_record() -> dict[str, Any]:  # diverged training: record NaNs rather than crash the loop
    nan = float("nan")
    return {
        "spectrum": "full",
        "fro_norm": nan,
        "spectral_norm": nan,
        "stable_rank": nan,
        "effective_rank": None,
        "numerical_rank": None,
        "top_singular_values": [],
    }


def _zero_record(k: int) -> dict[str, Any]:
    return {
        "spectrum": "full",
        "fro_norm": 0.0,
        "spectral_norm": 0.0,
        "stable_rank": 0.0,
        "effective_rank": 0.0,
        "numerical_rank": 0,
        "top_singular_values": [0.0] * k,
    }


def analyse_matrix(
    M: torch.Tensor, top_k: int, energy: float = 0.99, full_spectrum_max: int = 1024
) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """Rank measures of one matrix ``M`` (m, n), plus its top-k singular vectors.

    Returns ``(record, U_k (m, k'), V_k (n, k'))`` with k' = the number of the top-k singular values
    above ``1e-6 * s_1`` (``None, None`` for the zero matrix). ``record`` holds ``spectrum`` ("full"
    or "top-k"), ``fro_norm``, ``spectral_norm``, ``stable_rank``, ``effective_rank``,
    ``numerical_rank`` and ``top_singular_values`` (see the module docstring for the policy).
    """
    m, n = M.shape
    full = min(m, n)
    k = max(1, min(top_k, full))
    M = M.detach().to(compute_dtype(M.dtype))
    if full <= full_spectrum_max:
        try:
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        except (
            RuntimeError
        ):  # NaN/Inf, or LAPACK did not converge: the foundation's fallbacks (float64, jitter)
            if not bool(torch.isfinite(M).all()):
                return _nan_record(), None, None
            U, S, Vh = robust_svd(M)
        kind = "full"
        # scalar measures in NumPy float64 on the (at most full_spectrum_max) singular values: one transfer
        s = S.numpy().astype(np.float64) if S.device.type == "cpu" else S.double().cpu().numpy()
        s2 = s * s
        fro2 = float(s2.sum())
        if not math.isfinite(fro2):
            return _nan_record(), None, None
        if fro2 == 0.0:
            return _zero_record(k), None, None
        p = s[s > 0] / s.sum()
        eff: float | None = float(np.exp(-(p * np.log(p)).sum()))  # = ranks.effective_rank(S)
        cum = np.cumsum(s2)
        num: int | None = min(
            int((cum < energy * fro2 * (1 - 1e-12)).sum()) + 1, len(s)
        )  # = ranks.numerical_rank
        top = s[:k].tolist()
    else:
        if not bool(torch.isfinite(M).all()):
            return _nan_record(), None, None
        fro2 = float(torch.linalg.vector_norm(M, dtype=torch.float64)) ** 2
        if fro2 == 0.0:
            return _zero_record(k), None, None
        U, S, Vh = truncated_svd(M, k)
        kind = "top-k"
        eff = None
        top = S.double().tolist()
        cum = np.cumsum(np.square(top))
        reached = np.nonzero(cum >= energy * fro2 * (1 - 1e-12))[0]
        num = int(reached[0]) + 1 if len(reached) else None
    s1 = top[0]
    keep = sum(v > 1e-6 * s1 for v in top)
    record = {
        "spectrum": kind,
        "fro_norm": math.sqrt(fro2),
        "spectral_norm": s1,
        "stable_rank": fro2 / s1**2 if s1 > 0 else 0.0,
        "effective_rank": eff,
        "numerical_rank": num,
        "top_singular_values": top,
    }
    return record, U[:, :keep], Vh[:keep].T


def max_principal_angle(A: torch.Tensor | None, B: torch.Tensor | None) -> float | None:
    """Largest principal angle (radians) between span(A) (m, p) and span(B) (m, q), A and B with
    orthonormal columns (as singular vectors are): ``principal_angles(A, B).max()`` without
    re-orthonormalising, as arccos of the smallest singular value of A^T B computed in float64.
    Resolution ~1e-3 rad near 0 for float32 singular vectors (their own orthonormality error), exact
    near pi/2; use :func:`torchlowrank.linalg.principal_angles` for all angles to full accuracy.
    None if either basis is empty.
    """
    if A is None or B is None or A.shape[1] == 0 or B.shape[1] == 0:
        return None
    C = A.T.double() @ B.double()  # (p, q)
    cos = float(torch.linalg.svdvals(C).min())
    return math.acos(min(1.0, max(0.0, cos)))


class SpectrumTracker:
    """Record spectra and ranks of weights, updates W - W0 and gradients every ``every`` steps.

    model: any ``nn.Module``; targets: which layers (PEFT ``target_modules`` semantics, default every
    Linear / Conv / Embedding / factorized layer, see ``tlr.ranks.layer_weight``; a weight tied to
    several modules is tracked once, under its first name, as ``tlr.spectrum`` lists it: both use
    ``tlr.ranks.weight_layers``); track: a subset of
    ``("weight", "update", "grad")``; top_k: singular values kept per record and the dimension of the
    subspaces compared by principal angles; energy: for the numerical rank; full_spectrum_max: see
    the module docstring. The step-0 weights are recorded when the tracker is built.

    ``history`` is a tidy list of rows (one per step x layer x quantity, columns ``HISTORY_COLUMNS``);
    ``save(path)`` writes it as ``.json`` or ``.csv`` atomically; ``plots()`` describes figures.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 50,
        track: Sequence[str] = QUANTITIES,
        targets: Targets = None,
        top_k: int = 8,
        energy: float = 0.99,
        full_spectrum_max: int = 1024,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (record every N optimizer steps), got {every!r}")
        if isinstance(track, str):
            track = (track,)
        bad = [q for q in track if q not in QUANTITIES]
        if bad or not track:
            raise ValueError(f"track must be a non-empty subset of {QUANTITIES}, got {tuple(track)!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if (
            isinstance(full_spectrum_max, bool)
            or not isinstance(full_spectrum_max, int)
            or full_spectrum_max < 0
        ):
            raise ValueError(
                "full_spectrum_max must be an int >= 0 (layers whose smaller side is at most this get "
                f"a full SVD; 0 = always top-k only), got {full_spectrum_max!r}"
            )
        self.model = model
        self.every = every
        self.track = tuple(q for q in QUANTITIES if q in track)
        self.top_k = top_k
        self.energy = energy
        self.full_spectrum_max = full_spectrum_max
        self.layers = weight_layers(model, targets)  # tied weights once, as in tlr.spectrum
        for name, module in self.layers:
            check_not_meta(layer_weight(module), f"the weight of layer {name!r}")
        self.steps = 0
        self.history: list[dict[str, Any]] = []
        self._w0: dict[str, torch.Tensor] = {}
        self._ref: dict[tuple[str, str], tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._hook = None
        if "update" in self.track and distributed.is_main_process():
            with torch.no_grad():
                for name, module in self.layers:
                    self._w0[name] = (
                        as_matrix(layer_weight(module)).to(compute_dtype(layer_weight(module).dtype)).clone()
                    )
        self.record()

    # -- training-loop API -------------------------------------------------------------------
    def step(self) -> bool:
        """Count one optimizer step; record if the count is a multiple of ``every``. Returns whether it recorded."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.record()
            return True
        return False

    def attach(self, optimizer: torch.optim.Optimizer) -> SpectrumTracker:
        """Call :meth:`step` automatically after every ``optimizer.step()`` (a step post-hook)."""
        if self._hook is not None:
            raise ValueError("this tracker is already attached to an optimizer; call detach() first")
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        return self

    def detach(self) -> None:
        """Remove the hook installed by :meth:`attach`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _matrices(self, name: str, module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
        W = layer_weight(module)
        if "weight" in self.track:
            yield "weight", as_matrix(W)
        if "update" in self.track and self.steps > 0:
            Wm = as_matrix(W)
            yield "update", Wm.to(self._w0[name].dtype) - self._w0[name]
        if "grad" in self.track:
            G = matrix_view(module).tensor_grad()
            if G is not None:
                yield "grad", as_matrix(G)

    @torch.no_grad()
    def record(self) -> list[dict[str, Any]]:
        """Record every targeted layer now, at step ``self.steps``; returns the new rows.

        Under DDP only rank 0 records (the weights and all-reduced gradients are the same on every
        rank); the other ranks count steps and return ``[]``."""
        if not distributed.is_main_process():
            return []
        rows = []
        device_type = next((p.device.type for p in self.model.parameters()), "cpu")
        with torch.autocast(device_type=device_type, enabled=False):
            for name, module in self.layers:
                rows.extend(self._record_layer(name, module))
        self.history.extend(rows)
        return rows

    def _record_layer(self, name: str, module: nn.Module) -> list[dict[str, Any]]:
        rows = []
        for quantity, M in self._matrices(name, module):
            rec, Uk, Vk = analyse_matrix(M, self.top_k, self.energy, self.full_spectrum_max)
            key = (name, quantity)
            if key not in self._ref and Uk is not None:
                self._ref[key] = (Uk.clone(), Vk.clone())
            ref_u, ref_v = self._ref.get(key, (None, None))
            row = {
                "step": self.steps,
                "layer": name,
                "quantity": quantity,
                "rows": M.shape[0],
                "cols": M.shape[1],
                "full_rank": min(M.shape),
                **rec,
                "angle_left": max_principal_angle(Uk, ref_u),
                "angle_right": max_principal_angle(Vk, ref_v),
            }
            rows.append({c: row[c] for c in HISTORY_COLUMNS})
        return rows

    # -- outputs -------------------------------------------------------------------------------
    def rows(self, quantity: str | None = None, layer: str | None = None) -> list[dict[str, Any]]:
        """History rows, optionally filtered by quantity and / or layer name."""
        return [
            r
            for r in self.history
            if (quantity is None or r["quantity"] == quantity) and (layer is None or r["layer"] == layer)
        ]

    def series(self, layer: str, quantity: str, column: str = "stable_rank") -> tuple[list[int], list]:
        """(steps, values of ``column``) for one layer and quantity."""
        rs = self.rows(quantity, layer)
        return [r["step"] for r in rs], [r[column] for r in rs]

    def table(self, quantity: str | None = None, step: int | None = None) -> Table:
        """The history (optionally one quantity, one step; default the last step) as a report Table."""
        rs = self.rows(quantity)
        if step is None and rs:
            step = rs[-1]["step"]
        rs = [r for r in rs if step is None or r["step"] == step]
        cols = [
            "step",
            "layer",
            "quantity",
            "shape",
            "full rank",
            "stable rank",
            "effective rank",
            "numerical rank",
            "angle left",
            "angle right",
            "top singular values",
        ]
        return Table(
            f"spectra at step {step}" + (f" ({quantity})" if quantity else ""),
            cols,
            [
                [
                    r["step"],
                    r["layer"],
                    r["quantity"],
                    f"{r['rows']}x{r['cols']}",
                    r["full_rank"],
                    r["stable_rank"],
                    r["effective_rank"],
                    r["numerical_rank"],
                    r["angle_left"],
                    r["angle_right"],
                    ", ".join(f"{v:.3g}" for v in r["top_singular_values"][:4]),
                ]
                for r in rs
            ],
        )

    def to_csv(self) -> str:
        """The history as CSV text (singular values joined by ';', missing values empty)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(HISTORY_COLUMNS)
        for r in self.history:
            w.writerow(
                [
                    ""
                    if r[c] is None
                    else ";".join(f"{v:.9g}" for v in r[c])
                    if isinstance(r[c], list)
                    else r[c]
                    for c in HISTORY_COLUMNS
                ]
            )
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the history atomically: ``.csv`` as CSV, anything else as JSON (config + rows).
        Under DDP rank 0 writes and the other ranks wait for it."""
        return distributed.main_process_only(self._save)(path)

    def _save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.suffix.lower() == ".csv":
            return atomic_write_text(path, self.to_csv())
        config = {
            "every": self.every,
            "track": list(self.track),
            "top_k": self.top_k,
            "energy": self.energy,
            "full_spectrum_max": self.full_spectrum_max,
            "layers": [n for n, _ in self.layers],
        }
        data = jsonable({"config": config, "history": self.history})  # NaN -> "nan": strict JSON
        return atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False))

    def plots(
        self,
        quantities: Sequence[str] | None = None,
        measure: str = "stable_rank",
        layers: Sequence[str] | None = None,
    ) -> list[Plot]:
        """Standard figures (see :func:`torchlowrank.diagnostics.plots.tracker_plots`)."""
        from .plots import tracker_plots

        return tracker_plots(
            self.history, quantities=quantities or self.track, measure=measure, layers=layers
        )

    def __repr__(self) -> str:
        return (
            f"SpectrumTracker({len(self.layers)} layers, every={self.every}, track={self.track}, "
            f"steps={self.steps}, rows={len(self.history)})"
        )


_INT_COLUMNS = ("step", "rows", "cols", "full_rank", "numerical_rank")
_FLOAT_COLUMNS = ("fro_norm", "spectral_norm", "stable_rank", "effective_rank", "angle_left", "angle_right")


def _history_from_csv(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a tracker history CSV ({e})") from e
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or list(reader.fieldnames) != HISTORY_COLUMNS:
        raise ValueError(
            f"{path} is not a tracker history CSV written by SpectrumTracker.save: expected the columns "
            f"{', '.join(HISTORY_COLUMNS)}, got {reader.fieldnames}"
        )
    rows = []
    try:
        for raw in reader:
            row: dict[str, Any] = dict(raw)
            for c in _INT_COLUMNS:
                row[c] = None if raw[c] == "" else int(raw[c])
            for c in _FLOAT_COLUMNS:
                row[c] = None if raw[c] == "" else float(raw[c])
            row["top_singular_values"] = [float(v) for v in raw["top_singular_values"].split(";") if v != ""]
            rows.append(row)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: a row of the tracker history CSV could not be parsed ({e})") from e
    return rows


def load_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read back the rows written by :meth:`SpectrumTracker.save` (``.csv`` or JSON), with the same
    types as ``tracker.history`` (ints, floats, None for missing values, lists of singular values)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise FileNotFoundError(f"no tracker history at {path}")
        return _history_from_csv(path)
    data = read_json(path, "tracker history", "write it with SpectrumTracker.save(path)")
    try:
        return list(data["history"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a tracker history JSON written by SpectrumTracker.save ({e})") from e
