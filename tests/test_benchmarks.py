"""The benchmark harness: quick runs never overwrite committed results; the tables of
docs/benchmarks.md are a generated block."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_elsewhere_and_leaves_committed_results_and_docs_alone():
    run = _harness()
    assert run.BENCHMARKS_PAGE == ROOT / "docs" / "benchmarks.md"
    committed = ROOT / "benchmarks" / "results" / "layers.json"
    before = committed.read_bytes() if committed.exists() else None
    page, readme = run.BENCHMARKS_PAGE.read_bytes(), (ROOT / "README.md").read_bytes()
    assert run.main(["layers", "--quick"]) == 0
    assert (ROOT / "benchmarks" / "results" / "quick" / "layers.json").is_file()
    assert (committed.read_bytes() if committed.exists() else None) == before
    assert run.BENCHMARKS_PAGE.read_bytes() == page and (ROOT / "README.md").read_bytes() == readme


def test_the_committed_benchmarks_page_holds_the_generated_block_and_the_readme_does_not():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert page.count("<!-- bench:begin ") == page.count("<!-- bench:end ") >= 1
    assert "bench:begin" not in (ROOT / "README.md").read_text()


def test_machine_file_merges_runs_and_the_page_block_is_replaced_in_place(tmp_path):
    run = _harness()
    layers = json.loads((ROOT / "benchmarks" / "results" / "layers.json").read_text())
    path = tmp_path / "cpu-test.json"
    run.update_machine_file(path, {"layers": layers})
    data = run.update_machine_file(path, {"other": {**layers, "name": "other"}})
    assert sorted(data["benchmarks"]) == ["layers", "other"]
    page = tmp_path / "benchmarks.md"
    assert not run.update_benchmarks_page(data, page)  # no page, nothing written
    page.write_text("# Benchmarks\n\nprose\n\n## All benchmark tables\n")
    assert run.update_benchmarks_page(data, page)
    text = page.read_text()
    assert text.count("<!-- bench:begin cpu-test -->") == 1 and text.index("prose") < text.index(
        "## All benchmark tables"
    ) < text.index("bench:begin")
    title = layers["tables"][0]["title"]
    assert f"*{title}*" in text
    text = page.read_text().replace("<!-- bench:end cpu-test -->", "<!-- bench:end cpu-test -->\n\nafter")
    page.write_text(text)
    data = run.update_machine_file(path, {"layers": {**layers, "tables": []}})
    run.update_benchmarks_page(data, page)
    text = page.read_text()
    assert text.count("bench:begin cpu-test") == 1 and f"*{title}*" in text  # still there via "other"
    assert text.count(f"*{title}*") == 1 and text.endswith("after\n")  # replaced in place


def test_machine_name_is_a_safe_file_name():
    name = _harness().machine_name()
    assert name and all(c.isalnum() or c in "-_." for c in name)


def test_a_pipe_inside_a_cell_is_escaped_in_the_generated_block():
    run = _harness()
    table = {"title": "t", "columns": ["method", "error"], "rows": [["lam = 1e-3 ||P(M)||_2", 0.5]]}
    text = run.machine_markdown({"machine": "m", "benchmarks": {"x": {"tables": [table]}}})
    assert "| lam = 1e-3 \\|\\|P(M)\\|\\|_2 | 0.5 |" in text
