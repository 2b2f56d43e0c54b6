"""The ``torchlowrank`` command: demo, reproduce, inspect.

torchlowrank demo                       # the embedded default, writes torchlowrank-report/
torchlowrank reproduce --list           # registered experiments
torchlowrank reproduce NAME [--quick]   # run one, write its report
torchlowrank inspect PATH               # spectrum table + plot of a checkpoint's weights
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path


def _print(*args) -> None:
    print(*args, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from .experiments import demo_sections
    from .report import result_markdown, write_report

    sections = demo_sections()
    if args.sections:
        wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
        known = [s.name for s in sections]
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"unknown demo section(s) {unknown}; available: {', '.join(known)}")
        sections = [s for s in sections if s.name in wanted]
    out = Path(args.out)
    t_all = time.perf_counter()
    index = ["# torchlowrank demo report", ""]
    for s in sections:
        _print(f"\n=== demo section: {s.name} ===")
        t0 = time.perf_counter()
        result = s.run(progress=None if not args.quiet else False)
        paths = write_report(result, out)
        _print(result_markdown(result, heading=3))
        _print(f"[{s.name}: {time.perf_counter() - t0:.1f} s -> {paths['md']}]")
        index.append(f"- [{result.name}]({paths['md'].name}) ({time.perf_counter() - t0:.0f} s)")
    from .files import atomic_write_text

    atomic_write_text(out / "README.md", "\n".join(index) + "\n")
    _print(
        f"\nDemo finished in {time.perf_counter() - t_all:.0f} s; report in {out}/ (start with {out / 'README.md'})"
    )
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments import get_experiment, list_experiments
    from .report import result_markdown, write_report

    if args.list or not args.name:
        _print("Registered experiments (run: torchlowrank reproduce NAME [--quick]):")
        for e in list_experiments():
            _print(f"  {e.name:24s} {e.description}")
        return 0
    exp = get_experiment(args.name)
    out = Path(args.out or os.path.join("reports", exp.name))
    _check_writable(out)
    from .reproducibility import git_commit

    commit = git_commit()  # the code that runs: read before the run, the tree may move on during it
    _print(f"Running {exp.name}{' (quick)' if args.quick else ''} with seed {args.seed} ...")
    result = exp.run(quick=args.quick, seed=args.seed, progress=None if not args.quiet else False)
    result.environment["command"] = " ".join(
        ["torchlowrank reproduce", exp.name]
        + (["--quick"] if args.quick else [])
        + ([f"--seed {args.seed}"] if args.seed else [])
        + [f"--out {out}"]
    )
    result.environment["git_commit"] = commit
    paths = write_report(result, out)
    _print(result_markdown(result, heading=2))
    _print(f"Report: {paths['md']} ({result.wall_time_s:.1f} s)")
    return 0


def _check_writable(out: Path) -> None:
    """Fail before any work if the report folder cannot be created or written."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot write the report to {out}: {probe} is not a writable folder; pass another --out"
        )


def cmd_inspect(args: argparse.Namespace) -> int:
    import re

    from .diagnostics.inspect import compare_weights, load_weights, weights_spectrum
    from .ranks import check_top_k
    from .report import write_report
    from .reproducibility import environment_info
    from .results import Plot, Result, Series, Table

    check_top_k(args.top_k)
    if args.max_plot < 1:
        raise ValueError(f"--max-plot must be >= 1, got {args.max_plot}")
    pattern = None
    if args.targets:
        try:
            pattern = re.compile(args.targets)
        except re.error as e:
            raise ValueError(f"--targets {args.targets!r} is not a valid regular expression: {e}") from e
    if args.out:
        _check_writable(Path(args.out))
    weights = load_weights(args.path)
    title = f"Spectra of {args.path}"
    if args.compare:
        weights = compare_weights(weights, load_weights(args.compare))
        title = f"Spectra of the update {args.compare} - {args.path}"
        _print(weights.summary())
    table = weights_spectrum(weights, top_k=args.top_k)
    if pattern is not None:
        table.__init__([r for r in table if pattern.search(r.name)])
    if not table:
        raise ValueError(
            f"no 2-D (or conv) weights found in {args.path}"
            + (f" matching {args.targets!r}" if args.targets else "")
        )
    _print(title)
    _print(str(table))
    if args.out:
        from .ranks import singular_values

        series = [
            Series(r.name, list(range(1, len(sv) + 1)), sv)
            for r, sv in ((r, singular_values(weights[r.name]).tolist()) for r in table[: args.max_plot])
        ]
        result = Result(
            name="inspect",
            config={"path": str(args.path), "compare": args.compare},
            tables=[Table(title, table.columns, table.rows())],
            plots=[
                Plot(
                    "spectra",
                    title[:80],
                    "line",
                    series,
                    xlabel="index i",
                    ylabel="singular value",
                    logy=True,
                )
            ],
            environment=environment_info(),
        )
        paths = write_report(result, args.out)
        _print(f"Report: {paths['md']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="torchlowrank", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"torchlowrank {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="run the embedded default demo on real data and write a report",
        description="Train on real data bundled with the installed packages, show spectra, "
        "truncate, adapt; writes Markdown + JSON + PNG into --out.",
    )
    d.add_argument("--out", default="torchlowrank-report", help="output folder (default: %(default)s)")
    d.add_argument("--sections", default=None, help="comma-separated subset of demo sections to run")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser(
        "reproduce",
        help="run a registered experiment and write its report",
        description="Run a registered reproduction; --list shows them all.",
    )
    r.add_argument("name", nargs="?", help="experiment name (see --list)")
    r.add_argument("--list", action="store_true", help="list registered experiments")
    r.add_argument("--quick", action="store_true", help="small version (minutes, used by the tests)")
    r.add_argument("--seed", type=int, default=0, help="base random seed (default: %(default)s)")
    r.add_argument("--out", default=None, help="output folder (default: reports/NAME)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_reproduce)

    i = sub.add_parser(
        "inspect",
        help="spectrum table (and plot) of the weights in a checkpoint",
        description="Spectra and ranks of every matrix in a .safetensors file, a torch checkpoint "
        "(loaded with weights_only=True) or a PEFT adapter folder (B A per module). "
        "With --compare, the spectra of the difference OTHER - PATH (a fine-tuning update).",
    )
    i.add_argument("path", help=".safetensors file, torch checkpoint (.pt/.pth/.bin) or PEFT adapter folder")
    i.add_argument("--compare", default=None, metavar="OTHER", help="second checkpoint: inspect OTHER - PATH")
    i.add_argument("--top-k", type=int, default=5, help="top singular values to show (default: %(default)s)")
    i.add_argument("--targets", default=None, help="regex: only tensors whose name matches")
    i.add_argument("--out", default=None, help="also write a report (table + spectra plot) into this folder")
    i.add_argument("--max-plot", type=int, default=12, help="layers drawn in the plot (default: %(default)s)")
    i.set_defaults(func=cmd_inspect)
    return p


@contextlib.contextmanager
def _offline_env():
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE = 1 inside the block (unless the caller set them),
    restored after: the command never reaches for a hub, and ``main()`` called as a function leaves
    the caller's environment as it was."""
    saved = {k: os.environ.get(k) for k in _OFFLINE_VARS}
    for k in _OFFLINE_VARS:
        os.environ.setdefault(k, "1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        with _offline_env():
            return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"torchlowrank {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
