"""mtcl_jax: contrastive learning for multi-task learning in JAX.

Sub-modules are imported lazily by name (``from mtcl_jax import losses``) so that a user who only needs the
loss functions pays only for jax.
"""

__version__ = "0.1.0"
