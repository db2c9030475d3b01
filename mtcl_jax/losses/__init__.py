"""Contrastive and metric-learning losses: pure functions of arrays, jit, vmap and grad safe.

``from mtcl_jax import losses; losses.supcon(z, labels)`` is the whole API. Every hyper-parameter is
keyword-only; the math runs in float32 whatever the input dtype; a temperature may be a traced scalar.
``ntxent``, ``supcon``, ``task_contrastive`` and ``clip`` take ``block_size`` for the tiled version that never
holds the whole similarity matrix, and ``matmul_dtype=jnp.bfloat16`` for bf16 similarity products accumulated
in float32; ``sharded_loss`` (or ``all_gather_loss`` / ``ring_loss`` inside
``jax.shard_map``) computes them over a batch sharded across devices, negatives from every device.
"""

from mtcl_jax.losses._clip import clip
from mtcl_jax.losses._clip import sigmoid_pairwise
from mtcl_jax.losses._infonce import binary_infonce
from mtcl_jax.losses._margin import margin_contrastive
from mtcl_jax.losses._margin import triplet_margin
from mtcl_jax.losses._ntxent import ntxent
from mtcl_jax.losses._ntxent import supcon
from mtcl_jax.losses._ntxent import task_contrastive
from mtcl_jax.losses._sharded import all_gather_loss
from mtcl_jax.losses._sharded import ring_loss
from mtcl_jax.losses._sharded import sharded_loss

__all__ = (
    "all_gather_loss",
    "binary_infonce",
    "clip",
    "margin_contrastive",
    "ntxent",
    "ring_loss",
    "sharded_loss",
    "sigmoid_pairwise",
    "supcon",
    "task_contrastive",
    "triplet_margin",
)
