"""The documentation: the MkDocs site builds with --strict (no broken link, no docstring that fails to
render), and the README stays a short front door whose relative links all resolve."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings_handlers")),
    reason="needs the docs extra: pip install -e '.[docs]'",
)
def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    site = tmp_path / "site"
    assert (site / "index.html").is_file() and (site / "benchmarks.html").is_file()
    api = (site / "api" / "optim.html").read_text(encoding="utf-8")
    assert "LowRankAdam" in api and "basis_lr_ratio" in api  # the signature was rendered


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details to docs/"
    assert "bench:begin" not in README.read_text(encoding="utf-8")


def test_readme_relative_links_resolve():
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # not inside code blocks
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    missing = []
    for link in links:
        if re.match(r"^[a-z]+:", link) or link.startswith("#"):
            continue
        target = (ROOT / link.split("#", 1)[0]).resolve()
        if not target.exists():
            missing.append(link)
    assert not missing, f"README links to files that do not exist: {missing}"
