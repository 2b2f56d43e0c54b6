"""Registry of reproducible experiments and of the sections of ``torchlowrank demo``.

The built-in experiments are listed explicitly in :data:`EXPERIMENTS` (name -> module of this
package); each module defines ``DESCRIPTION`` and ``run(quick: bool = False, seed: int = 0,
progress: bool | None = None) -> Result``. The demo sections are listed in :data:`DEMO_SECTIONS`
(name -> (module, function, order)); ``torchlowrank demo`` runs them by ``order``. A module is
imported only when one of its entries is asked for, so heavy imports (transformers) stay out of
``import torchlowrank``. Experiments defined outside this package are added with
``@register_experiment("name", "one-line description")`` / ``@register_demo_section("name", order=...)``.
"""

from __future__ import annotations

import importlib
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


#: Built-in experiments: ``torchlowrank reproduce NAME`` runs ``torchlowrank.experiments.<module>.run``.
EXPERIMENTS: dict[str, str] = {
    "compressed-completion": "compressed_completion",
    "deep-lora-fewshot": "deep_lora_fewshot",
    "depth-width": "depth_width",
    "dmf-invariance": "dmf_invariance",
    "dropout-lowrank": "dropout_lowrank",
    "geometric-ablation": "geometric_ablation",
    "geolora-finetune": "geolora_finetune",
    "geometry-toy": "geometry_toy",
    "gradient-rank": "gradient_rank",
    "lowrank-lm": "lowrank_lm",
    "lowrank-pretrain": "lowrank_pretrain",
    "movielens": "movielens",
    "pretrained-spectra": "pretrained_spectra",
    "q3r-finetune": "q3r_finetune",
    "q3r-truncation": "q3r_truncation",
    "real-completion": "real_completion",
    "truncation-sweep": "truncation",
    "unknown-rank": "unknown_rank",
}

#: Built-in demo sections: name -> (module, function, order).
DEMO_SECTIONS: dict[str, tuple[str, str, int]] = {
    "truncation": ("truncation", "demo_truncation", 0),
    "tracker": ("gradient_rank", "demo_tracker", 10),
    "deep-lora": ("deep_lora_fewshot", "section", 20),
    "geometry": ("geometry_toy", "demo_geometry", 30),
    "lowrank-pretrain": ("lowrank_pretrain", "demo_pretrain", 31),
    "q3r": ("q3r_truncation", "demo_q3r", 40),
}

_EXTRA_EXPERIMENTS: dict[str, Experiment] = {}
_EXTRA_DEMO_SECTIONS: dict[str, DemoSection] = {}


def _module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def register_experiment(name: str, description: str) -> Callable[[ExperimentFn], ExperimentFn]:
    """Add an experiment defined outside this package (``run(quick, seed, progress) -> Result``)."""

    def deco(fn: ExperimentFn) -> ExperimentFn:
        if name in EXPERIMENTS or (name in _EXTRA_EXPERIMENTS and _EXTRA_EXPERIMENTS[name].run is not fn):
            raise ValueError(f"experiment {name!r} is registered twice")
        _EXTRA_EXPERIMENTS[name] = Experiment(name, description, fn)
        return fn

    return deco


def register_demo_section(name: str, order: int) -> Callable:
    """Add a demo section defined outside this package (``section(progress) -> Result``)."""

    def deco(fn: Callable[..., Result]) -> Callable[..., Result]:
        if name in DEMO_SECTIONS:
            raise ValueError(f"demo section {name!r} is registered twice")
        _EXTRA_DEMO_SECTIONS[name] = DemoSection(name, order, fn)
        return fn

    return deco


def get_experiment(name: str) -> Experiment:
    if name in EXPERIMENTS:
        mod = _module(EXPERIMENTS[name])
        return Experiment(name, mod.DESCRIPTION, mod.run)
    if name in _EXTRA_EXPERIMENTS:
        return _EXTRA_EXPERIMENTS[name]
    known = ", ".join(sorted([*EXPERIMENTS, *_EXTRA_EXPERIMENTS]))
    raise ValueError(f"unknown experiment {name!r}; available: {known}")


def list_experiments() -> list[Experiment]:
    return [get_experiment(n) for n in sorted([*EXPERIMENTS, *_EXTRA_EXPERIMENTS])]


def demo_sections() -> list[DemoSection]:
    sections = [
        DemoSection(name, order, getattr(_module(mod), fn))
        for name, (mod, fn, order) in DEMO_SECTIONS.items()
    ]
    return sorted([*sections, *_EXTRA_DEMO_SECTIONS.values()], key=lambda s: s.order)
