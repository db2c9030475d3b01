"""Sphinx configuration of the mtcl_jax documentation (Sphinx + MyST, as optax and flax).

Build, warnings as errors, from the repository root:
  python -m sphinx -W --keep-going -b html docs docs/_build/html

The docstrings' examples run as doctests in their modules' namespaces, through pytest (BUILD.md, "Documentation"):
  python -m pytest -n 0 -q --doctest-modules mtcl_jax/losses mtcl_jax/mtl ...
"""

import pathlib
import sys

import sphinx.util.inspect

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's mtcl_jax, installed or not

project = "mtcl_jax"
author = "the mtcl_jax authors"
copyright = "the mtcl_jax authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
root_doc = "index"

# Heading anchors, so a page can link to a section of another (guides/data.md#bring-your-own-data).
myst_heading_anchors = 3

# Google-style docstrings (Args:, Returns:, Raises:, Examples:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # a dataclass's Attributes: as fields of its class, not a second description of each
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Annotations are strings (``from __future__ import annotations``): keep the array aliases' names instead of
# expanding ``ArrayLike`` into its eight member types on every parameter.
autodoc_type_aliases = {"ArrayLike": "ArrayLike", "DTypeLike": "DTypeLike"}
# Sphinx 9.0 writes an alias inside a union (``ArrayLike | None``) by its repr, "TypeAliasForwardRef('ArrayLike')";
# its name is what a reader should see.
sphinx.util.inspect.TypeAliasForwardRef.__repr__ = lambda self: self.name

html_theme = "furo"
html_title = "mtcl_jax"
