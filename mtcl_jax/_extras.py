"""The install extras: a part of mtcl_jax whose dependencies the core install leaves out says which extra to add.

The core install (``pip install mtcl_jax``: jax, numpy, optax) is what ``losses``, ``similarity``, ``pairs``,
``mtl``, ``parallel`` and ``eval``'s probes and metrics import. ``data`` needs the ``data`` extra (TFDS without
TensorFlow, and the packages the offline datasets ship in); ``models``, ``train`` and ``mtcl_jax.run`` need the
``train`` extra, which includes ``data``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def requires(extra: str, part: str) -> Iterator[None]:
  """Turns a missing third-party module, imported inside, into one line naming the extra that installs it.

  Args:
    extra: the ``[project.optional-dependencies]`` entry that installs what ``part`` imports.
    part: the importing package, for the message, e.g. ``"mtcl_jax.train"``.

  Raises:
    ModuleNotFoundError: ``"mtcl_jax.train needs 'flax': pip install 'mtcl_jax[train]'"``.
  """
  try:
    yield
  except ModuleNotFoundError as error:
    if error.name is None or error.name.partition(".")[0] == "mtcl_jax":
      raise
    raise ModuleNotFoundError(f"{part} needs {error.name!r}, which the core install leaves out: "
                              f"pip install 'mtcl_jax[{extra}]'", name=error.name) from None
