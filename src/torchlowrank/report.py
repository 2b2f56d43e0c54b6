"""Render a :class:`~torchlowrank.results.Result` as JSON + Markdown + PNG plots.

``write_report(result, out_dir)`` writes ``<name>.json`` (everything, re-loadable with
``load_result``), ``<name>.md`` (metrics, tables, notes, links to the plots) and one
``<name>_<plot>.png`` per plot. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import atomic_path, atomic_write_text, read_json
from .results import Plot, Result, format_cell, markdown_table


def result_markdown(result: Result, image_names: dict[str, str] | None = None, heading: int = 2) -> str:
    """The Markdown body of a report (also used to paste results into the README)."""
    h = "#" * heading
    lines = [f"{h} {result.name}", ""]
    if result.notes:
        lines += [result.notes.strip(), ""]
    if result.metrics:
        lines += [markdown_table(["metric", "value"], [[k, v] for k, v in result.metrics.items()]), ""]
    for t in result.tables:
        lines += [f"{h}# {t.title}", "", markdown_table(t.columns, t.rows), ""]
    for p in result.plots:
        if image_names and p.name in image_names:
            lines += [f"![{p.title}]({image_names[p.name]})", ""]
    cfg = ", ".join(f"{k}={format_cell(v)}" for k, v in result.config.items())
    lines += [
        f"Config: {cfg}",
        "",
        f"Seeds: {result.seeds}; wall time {result.wall_time_s:.1f} s; "
        f"torch {result.environment.get('torch', '?')}, {result.environment.get('cpu_count', '?')} CPUs"
        + (f", {result.environment['cuda']}" if result.environment.get("cuda") else ""),
        "",
    ]
    provenance = []
    if result.environment.get("command"):
        provenance.append(f"produced by `{result.environment['command']}`")
    if result.environment.get("git_commit"):
        provenance.append(f"at commit {result.environment['git_commit']}")
    if provenance:
        lines += ["Provenance: " + " ".join(provenance) + ".", ""]
    return "\n".join(lines)


def draw_plot(plot: Plot, path: str | os.PathLike) -> Path:
    """Draw one :class:`Plot` to a PNG file.

    Uses matplotlib's object-oriented ``Figure`` (rendered by Agg on save) without pyplot, so the
    caller's backend (a notebook's inline backend, say) is never changed and no window opens.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.subplots()
    try:
        if plot.kind == "heatmap":
            if plot.matrix is None:
                raise ValueError(f"heatmap plot {plot.name!r} needs a matrix")
            im = ax.imshow(plot.matrix, aspect="auto", interpolation="nearest", cmap="viridis")
            fig.colorbar(im, ax=ax)
            if plot.xticks is not None:
                step = max(1, len(plot.xticks) // 12)
                ax.set_xticks(
                    range(0, len(plot.xticks), step),
                    [str(t) for t in plot.xticks[::step]],
                    rotation=45,
                    ha="right",
                    fontsize=7,
                )
            if plot.yticks is not None:
                ax.set_yticks(range(len(plot.yticks)), [str(t) for t in plot.yticks], fontsize=7)
        elif plot.kind == "hist":
            for s in plot.series:
                ax.hist(s.y, bins=plot.bins if plot.bins is not None else "auto", alpha=0.6, label=s.label)
        elif plot.kind == "bar":
            n = max(1, len(plot.series))
            width = 0.8 / n
            cats = list(plot.series[0].x) if plot.series else []
            for i, s in enumerate(plot.series):
                xs = [j + (i - (n - 1) / 2) * width for j in range(len(s.y))]
                ax.bar(xs, s.y, width=width, yerr=s.err, label=s.label, capsize=3)
            ax.set_xticks(range(len(cats)), [str(c) for c in cats])
        else:
            for s in plot.series:
                fmt = s.style or ("o" if plot.kind == "scatter" else "-")
                if s.err is not None and plot.kind == "line":
                    ax.errorbar(s.x, s.y, yerr=s.err, fmt=fmt, label=s.label, capsize=3)
                else:
                    ax.plot(s.x, s.y, fmt, label=s.label, markersize=3)
        for label, y in plot.hlines.items():
            ax.axhline(y, color="gray", linestyle=":", linewidth=1)
            ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, color="gray")
        if plot.logx:
            ax.set_xscale("log")
        if plot.logy:
            ax.set_yscale("log")
        ax.set_title(plot.title, fontsize=10)
        ax.set_xlabel(plot.xlabel)
        ax.set_ylabel(plot.ylabel)
        if plot.kind != "heatmap" and any(s.label for s in plot.series):
            ax.legend(fontsize=7)
        if plot.kind != "heatmap":
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        fig.clear()
    return path


def write_report(result: Result, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write JSON, Markdown and PNGs for ``result`` into ``out_dir``; returns ``{kind: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    images: dict[str, str] = {}
    for plot in result.plots:
        fname = f"{result.name}_{plot.name}.png"
        paths[f"png:{plot.name}"] = draw_plot(plot, out / fname)
        images[plot.name] = fname
    paths["json"] = atomic_write_text(
        out / f"{result.name}.json", json.dumps(result.to_dict(), indent=1, allow_nan=False)
    )
    paths["md"] = atomic_write_text(out / f"{result.name}.md", result_markdown(result, images, heading=1))
    return paths


def load_result(path: str | os.PathLike) -> Result:
    """Read a ``<name>.json`` written by :func:`write_report`."""
    data = read_json(path, "result JSON file", "re-run the experiment")
    return Result.from_dict(data)
