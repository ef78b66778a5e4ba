"""A griffe extension for the API page (mkdocs.yml loads it; `exclude_docs` keeps it out of the site).

The package's docstrings are Google style with two habits griffe does not read:

- an ``Example:`` section (singular): griffe knows ``Examples:`` only and would render the
  doctest lines as Markdown (``>>>`` as quotes, ``x["a"]["b"]`` as a broken reference link);
- Sphinx roles (``:func:`medtransfer.train```, ``:class:`~medtransfer.api.Model```), shown
  literally by Markdown: rendered here as inline code (``~`` keeps the last name, as in Sphinx).

Nothing else is changed. Once the docstrings say ``Examples:`` this extension only handles the roles.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match["target"]
    return f"`{target.rsplit('.', 1)[-1] if match['tilde'] else target}`"


def rewrite(text: str) -> str:
    """The docstring with ``Example:`` read as ``Examples:`` and Sphinx roles as inline code."""
    return _ROLE.sub(_role, _EXAMPLE_HEADER.sub(r"\g<indent>Examples:", text))


class GoogleDocstrings(griffe.Extension):
    """Rewrites each docstring once, when griffe creates the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
