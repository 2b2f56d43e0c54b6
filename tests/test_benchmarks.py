"""The benchmark harness: quick runs never overwrite committed results; the README block is generated."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_elsewhere_and_leaves_committed_results_and_readme_alone():
    run = _harness()
    committed = ROOT / "benchmarks" / "results" / "layers.json"
    before = committed.read_bytes() if committed.exists() else None
    readme = (ROOT / "README.md").read_bytes()
    assert run.main(["layers", "--quick"]) == 0
    assert (ROOT / "benchmarks" / "results" / "quick" / "layers.json").is_file()
    assert (committed.read_bytes() if committed.exists() else None) == before
    assert (ROOT / "README.md").read_bytes() == readme


def test_machine_file_merges_runs_and_the_readme_block_is_replaced_in_place(tmp_path):
    run = _harness()
    layers = json.loads((ROOT / "benchmarks" / "results" / "layers.json").read_text())
    path = tmp_path / "cpu-test.json"
    run.update_machine_file(path, {"layers": layers})
    data = run.update_machine_file(path, {"other": {**layers, "name": "other"}})
    assert sorted(data["benchmarks"]) == ["layers", "other"]
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Benchmarks\n\nprose\n\n## Layout\n\nend\n")
    assert run.update_readme(data, readme)
    text = readme.read_text()
    assert text.count("<!-- bench:begin cpu-test -->") == 1 and text.index("prose") < text.index(
        "bench:begin"
    ) < text.index("## Layout")
    title = layers["tables"][0]["title"]
    assert f"*{title}*" in text
    data = run.update_machine_file(path, {"layers": {**layers, "tables": []}})
    run.update_readme(data, readme)
    text = readme.read_text()
    assert text.count("bench:begin cpu-test") == 1 and f"*{title}*" in text  # still there via "other"
    assert text.count(f"*{title}*") == 1 and text.endswith("end\n")


def test_machine_name_is_a_safe_file_name():
    name = _harness().machine_name()
    assert name and all(c.isalnum() or c in "-_." for c in name)
