"""Progress bars that show on a terminal and stay quiet in logs, CI and tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_enabled(enabled: bool | None = None) -> bool:
    """``enabled`` if given; else on when stderr is a terminal, unless ``TLR_PROGRESS=0``."""
    if enabled is not None:
        return enabled
    env = os.environ.get("TLR_PROGRESS")
    if env is not None:
        return env not in ("0", "false", "no", "")
    return sys.stderr.isatty()


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool | None = None,
    **kwargs: Any,
) -> tqdm:
    """A ``tqdm`` bar, disabled unless :func:`progress_enabled`."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=not progress_enabled(enabled),
        leave=False,
        dynamic_ncols=True,
        **kwargs,
    )
