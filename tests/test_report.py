import json

import pytest

import torchlowrank as tlr
from torchlowrank.files import atomic_write_text
from torchlowrank.results import Plot, Result, Series, Table


def make_result():
    return Result(name="toy", config={"lr": 0.1}, seeds=[0, 1], metrics={"acc": 0.9, "nan": float("nan")},
                  history={"loss": [1.0, 0.5]},
                  tables=[Table("numbers", ["a", "b"], [[1, 2.5], [3, 1e-7]])],
                  plots=[Plot("curve", "a curve", "line", [Series("loss", [0, 1], [1.0, 0.5])], logy=True),
                         Plot("heat", "a heatmap", "heatmap", matrix=[[1, 2], [3, 4]], xticks=[0, 1], yticks=["x", "y"]),
                         Plot("hist", "a histogram", "hist", [Series("r", y=[0, 1, 1, 2])]),
                         Plot("bars", "bars", "bar", [Series("m", ["a", "b"], [1, 2], err=[0.1, 0.2])])])


def test_report_writes_json_markdown_and_pngs_and_round_trips(tmp_path):
    paths = tlr.write_report(make_result(), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"toy.json", "toy.md", "toy_curve.png", "toy_heat.png",
                                                    "toy_hist.png", "toy_bars.png"}
    assert paths["png:curve"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "| a | b |" in md and "1.000e-07" in md and "![a curve](toy_curve.png)" in md
    back = tlr.load_result(paths["json"])
    assert back.tables[0].rows == [[1, 2.5], [3, 1e-7]] and back.plots[0].series[0].y == [1.0, 0.5]
    assert json.loads(paths["json"].read_text())["metrics"]["nan"] == "nan"


def test_table_rows_must_match_columns():
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        Table("t", ["a", "b"], [[1]])


def test_unknown_plot_kind():
    with pytest.raises(ValueError, match="kind"):
        Plot("p", "p", "pie")


def test_corrupted_result_json(tmp_path):
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid result JSON"):
        tlr.load_result(tmp_path / "r.json")
    with pytest.raises(FileNotFoundError):
        tlr.load_result(tmp_path / "missing.json")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    from torchlowrank.files import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_written_files_get_the_usual_mode_and_overwrites_keep_it(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o600)
        atomic_write_text(path, "y")
        assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() == "y"
        os.umask(0o077)
        assert atomic_write_text(tmp_path / "b.txt", "z").stat().st_mode & 0o777 == 0o600
        paths = tlr.write_report(make_result(), tmp_path / "rep")
    finally:
        os.umask(old)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in paths.values())  # umask 077 at write time


def test_drawing_a_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    tlr.write_report(make_result(), tmp_path)
    assert matplotlib.get_backend() == before
