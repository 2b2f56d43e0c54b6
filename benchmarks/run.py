"""Benchmark harness: ``python benchmarks/run.py [--quick] [NAME ...]``.

Discovers ``benchmarks/bench_*.py``; each module defines ``run(quick: bool = False) -> Result``
whose tables report medians over repeats and ratios against a baseline measured in the same run.
Writes ``benchmarks/results/<name>.json`` and ``.md`` (plus plots) and prints the tables; ``--quick``
(a smoke test) writes to ``benchmarks/results/quick/`` (git-ignored) so it never overwrites the
committed full results.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    from torchlowrank.report import result_markdown, write_report

    found = discover()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(found)})")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke test)")
    ap.add_argument("--out", default=None, help="output folder (default: benchmarks/results, or "
                                                   "benchmarks/results/quick with --quick)")
    args = ap.parse_args(argv)
    out = args.out or str(HERE / "results" / "quick" if args.quick else HERE / "results")
    unknown = [n for n in args.names if n not in found]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; available: {', '.join(found)}")
    for name in args.names or list(found):
        t0 = time.perf_counter()
        print(f"== benchmark {name}", flush=True)
        result = load(found[name]).run(quick=args.quick)
        result.environment.setdefault("command", "python benchmarks/run.py " + name + (" --quick" if args.quick else ""))
        paths = write_report(result, out)
        print(result_markdown(result, heading=3))
        print(f"-> {paths['md']} ({time.perf_counter() - t0:.0f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
