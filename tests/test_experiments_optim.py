"""Quick runs of the geometry-toy and lowrank-pretrain reproductions (and their demo sections)."""

from __future__ import annotations

import pytest

from torchlowrank.experiments.registry import demo_sections, get_experiment
from torchlowrank.report import write_report


@pytest.fixture(scope="module")
def geometry():
    return get_experiment("geometry-toy").run(quick=True)


def _records(table):
    """The table's rows as dicts keyed by column name."""
    return [dict(zip(table.columns, row)) for row in table.rows]


def _final(result, problem, kappa, method):
    for row in _records(result.tables[0]):
        if (row["problem"], row["kappa"], row["method"]) == (problem, kappa, method):
            return row["final error"]
    raise KeyError((problem, kappa, method))


def test_geometry_toy_geometric_step_is_insensitive_to_conditioning(geometry, tmp_path):
    for kappa in ("1e+01", "1e+05"):
        assert _final(geometry, "approx", kappa, "LowRankSGD") < 1e-10
    # the factor methods stop far short of that in the same number of steps
    assert _final(geometry, "approx", "1e+05", "heavy ball on factors") > 1e3 * _final(
        geometry, "approx", "1e+05", "LowRankSGD"
    )
    assert geometry.config["command"].startswith("torchlowrank reproduce geometry-toy")
    paths = write_report(geometry, tmp_path)
    assert paths["md"].exists() and any(k.startswith("png:") for k in paths)


def test_lowrank_pretrain_quick_runs_every_method_at_its_budget(tmp_path):
    result = get_experiment("lowrank-pretrain").run(quick=True)
    rows = _records(result.tables[0])
    methods = {(r["model"], r["method"]) for r in rows}
    for arch in ("mlp", "lenet5"):
        for m in ("dense Adam", "factorized Adam", "GaLore", "LowRankAdam", "LowRankAdam tau=0.2"):
            assert (arch, m) in methods
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        if r["method"] in ("factorized Adam", "LowRankAdam"):
            assert r["kept"] < 0.13  # kept fraction of the targeted parameters ~ the 10% budget
        if r["method"] == "GaLore":
            assert r["kept"] == 1.0  # GaLore keeps dense parameters
    dense_mlp = next(r for r in rows if (r["model"], r["method"]) == ("mlp", "dense Adam"))
    assert dense_mlp["accuracy"] > 0.5  # it trained (10 classes: chance is 0.1)
    write_report(result, tmp_path)


def test_demo_sections_are_registered():
    names = {s.name for s in demo_sections()}
    assert {"geometry", "lowrank-pretrain"} <= names
