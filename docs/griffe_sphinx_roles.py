"""A griffe extension for the API pages: Sphinx cross-reference roles in docstrings
(:class:`X`, :func:`~a.b`, :meth:, :attr:, :mod:, :data:, :exc:, :obj:) become Markdown code spans.

The source keeps its docstrings as they are; only the rendered pages change. Loaded by mkdocstrings
(``extensions:`` in mkdocs.yml), never imported by the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
