"""Sphinx configuration of the mtcl_jax documentation (Sphinx + MyST, as optax and flax).

Build, warnings as errors, from the repository root:
  python -m sphinx -W --keep-going -b html docs docs/_build/html
  python -m sphinx -b doctest docs docs/_build/doctest      # the docstrings' examples, run
"""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's mtcl_jax, installed or not

project = "mtcl_jax"
author = "the mtcl_jax authors"
copyright = "the mtcl_jax authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
root_doc = "index"

# MyST: ```{directive} blocks, $-free markdown, heading anchors for the pages' links to one another.
myst_enable_extensions = ["colon_fence", "deflist"]
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

# The docstrings' >>> examples are doctests: `-b doctest` runs every one of them.
doctest_global_setup = "import jax\nimport jax.numpy as jnp\nimport numpy as np"
doctest_test_doctest_blocks = "default"

html_theme = "furo"
html_title = "mtcl_jax"
