"""Registry of reproducible experiments and of the sections of ``torchlowrank demo``.

An experiment is a function ``run(quick: bool = False, seed: int = 0, progress: bool | None = None)
-> Result`` registered with ``@register_experiment("name", "one-line description")``. A demo
section is ``section(progress: bool | None = None) -> Result`` registered with
``@register_demo_section("name", order=...)``; ``torchlowrank demo`` runs them by ``order``.
Modules in this package are imported lazily by :func:`load_all`, so heavy imports (transformers)
belong inside the functions.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from ..results import Result

ExperimentFn = Callable[..., Result]


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    run: ExperimentFn


@dataclass(frozen=True)
class DemoSection:
    name: str
    order: int
    run: Callable[..., Result]


_EXPERIMENTS: dict[str, Experiment] = {}
_DEMO_SECTIONS: dict[str, DemoSection] = {}
_LOADED = False


def register_experiment(name: str, description: str) -> Callable[[ExperimentFn], ExperimentFn]:
    def deco(fn: ExperimentFn) -> ExperimentFn:
        if name in _EXPERIMENTS and _EXPERIMENTS[name].run is not fn:
            raise ValueError(f"experiment {name!r} is registered twice")
        _EXPERIMENTS[name] = Experiment(name, description, fn)
        return fn

    return deco


def register_demo_section(name: str, order: int) -> Callable:
    def deco(fn: Callable[..., Result]) -> Callable[..., Result]:
        _DEMO_SECTIONS[name] = DemoSection(name, order, fn)
        return fn

    return deco


def load_all() -> None:
    """Import every module of ``torchlowrank.experiments`` so that their registrations run."""
    global _LOADED
    if _LOADED:
        return
    import torchlowrank.experiments as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def list_experiments() -> list[Experiment]:
    load_all()
    return sorted(_EXPERIMENTS.values(), key=lambda e: e.name)


def get_experiment(name: str) -> Experiment:
    load_all()
    if name not in _EXPERIMENTS:
        known = ", ".join(sorted(_EXPERIMENTS)) or "(none)"
        raise ValueError(f"unknown experiment {name!r}; available: {known}")
    return _EXPERIMENTS[name]


def demo_sections() -> list[DemoSection]:
    load_all()
    return sorted(_DEMO_SECTIONS.values(), key=lambda s: s.order)
