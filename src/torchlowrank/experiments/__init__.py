"""Reproductions of published low-rank phenomena, one module each, and the demo sections.

Use ``list_experiments()`` / ``get_experiment(name).run(quick=True)``, or the CLI
``torchlowrank reproduce --list``.
"""

from .registry import (
    DemoSection,
    Experiment,
    demo_sections,
    get_experiment,
    list_experiments,
    register_demo_section,
    register_experiment,
)

__all__ = [
    "Experiment",
    "DemoSection",
    "register_experiment",
    "register_demo_section",
    "list_experiments",
    "get_experiment",
    "demo_sections",
]
