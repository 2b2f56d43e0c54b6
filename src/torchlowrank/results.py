"""Plain-data records that experiments return and ``report`` renders.

A :class:`Result` holds only JSON-serialisable values (numbers, strings, lists, dicts), so a saved
report can be re-plotted or compared without re-running anything. Plots are *described* here
(:class:`Plot`) and drawn by :mod:`torchlowrank.report`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Series:
    """One curve of a line/scatter plot, one histogram sample, or one bar group.

    For ``kind="line"``/``"scatter"``: ``x`` and ``y`` of equal length.
    For ``kind="hist"``: ``y`` holds the values to bin (``x`` unused).
    For ``kind="bar"``: ``x`` holds category labels, ``y`` the heights, ``err`` optional error bars.
    """

    label: str
    x: list = field(default_factory=list)
    y: list = field(default_factory=list)
    err: list | None = None
    style: str | None = None  # matplotlib format string, e.g. "--" or "o-"


@dataclass
class Plot:
    """A figure description; ``report`` draws it as ``<result name>_<name>.png``.

    kind: "line" | "scatter" | "hist" | "bar" | "heatmap".
    For "heatmap", ``matrix`` is a list of rows and ``xticks``/``yticks`` label the axes.
    """

    name: str
    title: str
    kind: str = "line"
    series: list[Series] = field(default_factory=list)
    xlabel: str = ""
    ylabel: str = ""
    logx: bool = False
    logy: bool = False
    matrix: list[list[float]] | None = None
    xticks: list | None = None
    yticks: list | None = None
    bins: int | list | None = None
    hlines: dict[str, float] = field(default_factory=dict)  # label -> y value of a reference line

    KINDS = ("line", "scatter", "hist", "bar", "heatmap")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"Plot kind must be one of {self.KINDS}, got {self.kind!r}")


@dataclass
class Table:
    """A Markdown table: ``columns`` names, ``rows`` lists of cells (numbers are formatted by report)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]

    def to_markdown(self) -> str:
        return markdown_table(self.columns, self.rows)

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"Table {self.title!r}: row {i} has {len(row)} cells, expected {len(self.columns)}"
                )


@dataclass
class Result:
    """What one experiment run produced.

    name: registry name of the experiment; config: its settings; seeds: the seeds used;
    metrics: headline scalars; history: per-step curves (name -> list); tables / plots: what the
    report shows; notes: Markdown prose (what was tested, what was observed); wall_time_s: total
    time; environment: torch / python / platform versions (filled by ``environment_info``).
    """

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    notes: str = ""
    wall_time_s: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        d = dict(d)
        d["tables"] = [Table(**t) for t in d.get("tables", [])]
        plots = []
        for p in d.get("plots", []):
            p = dict(p)
            p["series"] = [Series(**s) for s in p.get("series", [])]
            plots.append(Plot(**p))
        d["plots"] = plots
        return cls(**d)


def jsonable(obj: Any) -> Any:
    """Convert tensors / numpy scalars / non-finite floats into JSON-safe values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy array or scalar
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "nan", "inf": strict JSON has no such numbers
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def format_cell(v: Any) -> str:
    """Numbers to short strings: 4 significant digits, scientific for very small / large."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in rows]
    return "\n".join([head, sep, *body])
