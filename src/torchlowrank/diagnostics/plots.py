"""Figure descriptions (:class:`~torchlowrank.results.Plot`) from a tracker history.

Each function takes the tidy rows of :attr:`SpectrumTracker.history` (or :func:`load_history`), so
figures can be redrawn from a saved history without re-training:

- :func:`singular_value_plot`: the top singular values of one layer over the steps;
- :func:`rank_heatmap`: a rank measure, layers (rows) x recorded steps (columns);
- :func:`rank_curves`: a rank measure over the steps, one curve per layer;
- :func:`angle_plot`: the largest principal angle to the reference subspace over the steps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from ..results import Plot, Series

__all__ = ["singular_value_plot", "rank_heatmap", "rank_curves", "angle_plot", "tracker_plots"]

Rows = Sequence[dict[str, Any]]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "plot"


def _num(v: Any) -> float:
    if v is None or isinstance(v, str):
        return float("nan")
    return float(v)


def _select(rows: Rows, quantity: str, layers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return [r for r in rows if r["quantity"] == quantity and (layers is None or r["layer"] in layers)]


def _layer_order(rows: Rows) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r["layer"], None)
    return list(seen)


def singular_value_plot(
    rows: Rows, layer: str, quantity: str = "weight", top: int | None = None, logy: bool = True
) -> Plot:
    """Curves s_1(t), s_2(t), ... of one layer's ``quantity`` over the recorded steps."""
    rs = _select(rows, quantity, [layer])
    if not rs:
        raise ValueError(
            f"no {quantity!r} records for layer {layer!r}; layers recorded: {_layer_order(rows)}"
        )
    k = max(len(r["top_singular_values"]) for r in rs)
    k = min(k, top) if top else k
    series = []
    for i in range(k):
        pts = [(r["step"], r["top_singular_values"][i]) for r in rs if len(r["top_singular_values"]) > i]
        series.append(Series(f"s{i + 1}", [p[0] for p in pts], [p[1] for p in pts]))
    return Plot(
        f"sv_{quantity}_{_slug(layer)}",
        f"top singular values of {quantity} — {layer}",
        "line",
        series,
        xlabel="step",
        ylabel="singular value",
        logy=logy,
    )


def rank_heatmap(
    rows: Rows, quantity: str = "weight", measure: str = "stable_rank", relative: bool = False
) -> Plot:
    """Heatmap of ``measure`` (a history column), layers x steps; ``relative`` divides by the full rank."""
    rs = _select(rows, quantity)
    if not rs:
        raise ValueError(f"no {quantity!r} records in this history")
    layers = _layer_order(rs)
    steps = sorted({r["step"] for r in rs})
    col = {s: j for j, s in enumerate(steps)}
    row = {n: i for i, n in enumerate(layers)}
    matrix = [[float("nan")] * len(steps) for _ in layers]
    for r in rs:
        v = _num(r[measure])
        matrix[row[r["layer"]]][col[r["step"]]] = v / r["full_rank"] if relative and r["full_rank"] else v
    what = measure.replace("_", " ") + (" / full rank" if relative else "")
    return Plot(
        f"heatmap_{quantity}_{measure}",
        f"{what} of {quantity} (layers x steps)",
        "heatmap",
        matrix=matrix,
        xticks=steps,
        yticks=layers,
        xlabel="step",
        ylabel="layer",
    )


def rank_curves(
    rows: Rows,
    quantity: str = "grad",
    measure: str = "stable_rank",
    layers: Sequence[str] | None = None,
    relative: bool = False,
    hlines: dict[str, float] | None = None,
    logy: bool = False,
) -> Plot:
    """``measure`` over the steps, one curve per layer (``relative``: divided by the full rank)."""
    rs = _select(rows, quantity, layers)
    if not rs:
        raise ValueError(f"no {quantity!r} records for layers {layers}")
    series = []
    for name in _layer_order(rs):
        pts = [r for r in rs if r["layer"] == name]
        ys = [_num(r[measure]) / (r["full_rank"] if relative else 1) for r in pts]
        series.append(Series(name, [r["step"] for r in pts], ys, style="o-" if len(pts) < 30 else "-"))
    what = measure.replace("_", " ") + (" / full rank" if relative else "")
    return Plot(
        f"{measure}_{quantity}",
        f"{what} of {quantity} over training",
        "line",
        series,
        xlabel="step",
        ylabel=what,
        hlines=dict(hlines or {}),
        logy=logy,
    )


def angle_plot(
    rows: Rows, quantity: str = "weight", side: str = "left", layers: Sequence[str] | None = None
) -> Plot:
    """Largest principal angle (radians) between the top-k subspace and the reference one, per layer."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rs = [r for r in _select(rows, quantity, layers) if r[f"angle_{side}"] is not None]
    series = []
    for name in _layer_order(rs):
        pts = [r for r in rs if r["layer"] == name]
        series.append(Series(name, [r["step"] for r in pts], [_num(r[f"angle_{side}"]) for r in pts]))
    return Plot(
        f"angle_{quantity}_{side}",
        f"largest principal angle to the reference top-k {side} subspace ({quantity})",
        "line",
        series,
        xlabel="step",
        ylabel="angle (rad)",
        hlines={"pi/2": math.pi / 2},
    )


def tracker_plots(
    rows: Rows,
    quantities: Sequence[str] = ("weight", "update", "grad"),
    measure: str = "stable_rank",
    layers: Sequence[str] | None = None,
    max_layers: int = 12,
) -> list[Plot]:
    """The standard set: per quantity a rank heatmap and angle curves, and singular values over
    time for the first and last targeted layers (or ``layers``). Quantities without records are skipped."""
    plots: list[Plot] = []
    all_layers = _layer_order(rows)
    shown = (
        list(layers)
        if layers is not None
        else (all_layers[:1] + all_layers[-1:] if len(all_layers) > 1 else all_layers)
    )
    curve_layers = list(layers) if layers is not None else all_layers[:max_layers]
    for q in quantities:
        if not _select(rows, q):
            continue
        plots.append(rank_heatmap(rows, q, measure))
        if any(r["angle_left"] is not None for r in _select(rows, q)):
            plots.append(angle_plot(rows, q, "left", curve_layers))
        for name in dict.fromkeys(shown):
            if _select(rows, q, [name]):
                plots.append(singular_value_plot(rows, name, q))
    return plots
