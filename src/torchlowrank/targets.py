"""Selecting layers of a model by name, shared by factorize / truncate / adapt / trackers.

``targets`` follows PEFT's ``target_modules`` convention:
- ``None``: every layer that satisfies the predicate;
- a string: a regular expression that must match the whole module name (``re.fullmatch``);
- a list of strings: a module matches if its name equals an entry or ends with ``"." + entry``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

Targets = str | Sequence[str] | None


def name_matches(name: str, targets: Targets) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _describe(names: Iterable[str], limit: int = 40) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def find_targets(
    model: nn.Module,
    targets: Targets = None,
    predicate: Callable[[nn.Module], bool] | None = None,
    exclude: Targets = None,
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs of ``model`` selected by ``targets`` among modules passing ``predicate``.

    Raises ``ValueError`` listing the candidate names when nothing matches, or when ``targets`` is an
    invalid regular expression.
    """
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets {targets!r} is not a valid regular expression: {e}") from e
    elif targets is not None and not all(isinstance(t, str) for t in targets):
        raise ValueError(f"targets must be None, a regex string or a list of names, got {targets!r}")
    candidates = [(n, m) for n, m in model.named_modules() if n and (predicate is None or predicate(m))]
    chosen = [
        (n, m)
        for n, m in candidates
        if name_matches(n, targets) and not (exclude is not None and name_matches(n, exclude))
    ]
    if targets is not None and not isinstance(targets, str) and predicate is not None:
        # an entry that names only modules of an unsupported type would otherwise be dropped silently
        supported = {n for n, _ in candidates}
        for t in targets:
            named = [(n, type(m).__name__) for n, m in model.named_modules() if n and name_matches(n, [t])]
            if named and not any(n in supported for n, _ in named):
                shown = _describe(f"{n} ({k})" for n, k in named)
                raise ValueError(
                    f"target {t!r} names only layers of unsupported types: {shown}. Name supported "
                    f"layers inside them instead, e.g. from: {_describe(n for n, _ in candidates if n.startswith(named[0][0] + '.')) or _describe(supported)}"
                )
    if not chosen:
        what = (
            "no layers of a supported type"
            if not candidates
            else f"nothing among: {_describe(n for n, _ in candidates)}"
        )
        raise ValueError(
            f"targets {targets!r} matched {what}. Pass module names (or name suffixes) "
            "from that list, or a regular expression matching full names."
        )
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
