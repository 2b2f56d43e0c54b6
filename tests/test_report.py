import io
import json
import re
import tokenize
from pathlib import Path

import pytest

import torchlowrank as tlr
from torchlowrank.files import atomic_write_text
from torchlowrank.report import result_markdown
from torchlowrank.results import Plot, Result, Series, Table


def make_result():
    return Result(
        name="toy",
        config={"lr": 0.1},
        seeds=[0, 1],
        metrics={"acc": 0.9, "nan": float("nan")},
        history={"loss": [1.0, 0.5]},
        tables=[Table("numbers", ["a", "b"], [[1, 2.5], [3, 1e-7]])],
        plots=[
            Plot("curve", "a curve", "line", [Series("loss", [0, 1], [1.0, 0.5])], logy=True),
            Plot("heat", "a heatmap", "heatmap", matrix=[[1, 2], [3, 4]], xticks=[0, 1], yticks=["x", "y"]),
            Plot("hist", "a histogram", "hist", [Series("r", y=[0, 1, 1, 2])]),
            Plot("bars", "bars", "bar", [Series("m", ["a", "b"], [1, 2], err=[0.1, 0.2])]),
        ],
    )


def test_report_writes_json_markdown_and_pngs_and_round_trips(tmp_path):
    paths = tlr.write_report(make_result(), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "toy.json",
        "toy.md",
        "toy_curve.png",
        "toy_heat.png",
        "toy_hist.png",
        "toy_bars.png",
    }
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


# -- reports never show unformatted placeholders ------------------------------------------------------------
# "{prov['command']}" in a report is a string that lost its f prefix: a Python name in braces, optionally
# indexed / with an attribute, a conversion or a format spec. Dict reprs ("{'adam': 0.001}") do not match.
PLACEHOLDER = re.compile(
    r"\{[A-Za-z_][A-Za-z0-9_]*(\[[^\]{}]*\])*(\.[A-Za-z_][A-Za-z0-9_]*)*(![rsa])?(:[^{}]*)?\}"
)
ROOT = Path(__file__).resolve().parent.parent
COMMITTED = sorted((ROOT / "docs" / "results").glob("*/*.json"))


def test_the_placeholder_pattern_finds_a_lost_f_prefix_and_spares_dict_reprs():
    assert PLACEHOLDER.search("Reproduce: `{prov['command']}`.")
    assert (
        PLACEHOLDER.search("at {kappas[-1]:.0e}")
        and PLACEHOLDER.search("{name!r}")
        and PLACEHOLDER.search("{x.y}")
    )
    assert not PLACEHOLDER.search("Learning rates ({'adam': 0.001, 'galore': 0.01})")
    assert not PLACEHOLDER.search("lr_factors={2: 2.0, 3: 6.0}")


@pytest.mark.parametrize("path", [p.with_suffix(".md") for p in COMMITTED], ids=lambda p: p.parent.name)
def test_committed_reports_hold_no_unformatted_placeholders(path):
    found = [
        (i + 1, m.group())
        for i, line in enumerate(path.read_text().splitlines())
        for m in PLACEHOLDER.finditer(line)
    ]
    assert not found, f"{path}: unformatted placeholders (line, text): {found}"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name)
def test_the_report_writer_renders_each_committed_result_without_unformatted_placeholders(path):
    result = tlr.load_result(path)
    md = result_markdown(result, {p.name: f"{result.name}_{p.name}.png" for p in result.plots}, heading=1)
    assert not PLACEHOLDER.search(md), PLACEHOLDER.search(md).group()


def test_experiment_sources_have_no_placeholder_in_a_plain_string_piece():
    """Implicitly concatenated string pieces ("..." f"..." "...{x}") are each f-strings or not; a plain
    piece with a placeholder is printed verbatim (the report writer cannot catch it at run time
    without running the experiment)."""
    bad = []
    for path in sorted((ROOT / "src" / "torchlowrank" / "experiments").glob("*.py")):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type != tokenize.STRING or "f" in re.match(r"[A-Za-z]*", tok.string).group().lower():
                continue
            if tok.string.startswith(('"""', "'''")):
                continue  # docstrings
            body = tok.string.strip("\"'")
            if PLACEHOLDER.search(body) and not body.startswith(("{", "^")):
                bad.append(f"{path.name}:{tok.start[0]}: {tok.string[:80]}")
    assert not bad, "string pieces missing their f prefix: " + "; ".join(bad)
