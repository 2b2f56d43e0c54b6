"""A griffe extension for the API pages: Sphinx cross-reference roles in docstrings
(:class:`X`, :func:`~a.b`, :meth:, :attr:, :mod:, :data:, :exc:, :obj:) become Markdown code spans,
and a reStructuredText literal-block marker ("Usage::" ending a line) a plain colon (the indented
block after it renders as code in Markdown too).

The source keeps its docstrings as they are; only the rendered pages change. Loaded by mkdocstrings
(``extensions:`` in mkdocs.yml), never imported by the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"(?<=\S)::$", re.M)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = _LITERAL.sub(":", _ROLE.sub(r"`\1`", obj.docstring.value))
