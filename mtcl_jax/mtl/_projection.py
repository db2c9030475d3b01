"""(being written)"""

from mtcl_jax.mtl._base import Method  # noqa: F401

METHODS: dict = {}
