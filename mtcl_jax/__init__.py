"""mtcl_jax: contrastive learning for multi-task learning in JAX.

Sub-packages are imported lazily, on first use (``from mtcl_jax import losses`` or ``mtcl_jax.losses``), so that
``import mtcl_jax`` imports nothing else and a user who only needs the losses and ``mtl`` pays only for jax and
optax (the core install). ``data``, ``models``, ``train`` and ``run`` need an install extra, named when missing
(``pip install 'mtcl_jax[train]'``).
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("data", "eval", "losses", "modalities", "models", "mtl", "pairs", "parallel", "run", "similarity",
               "splits", "train")


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *_SUBMODULES])
