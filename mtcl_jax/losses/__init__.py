"""Contrastive and metric-learning losses: pure functions of arrays, jit, vmap and grad safe.

``from mtcl_jax import losses; losses.supcon(z, labels)`` is the whole API. Every hyper-parameter is
keyword-only; the math runs in float32 whatever the input dtype; a temperature may be a traced scalar.
``jax.grad``, ``jax.jvp``, ``jax.vmap`` and ``jax.jit`` work on every loss.

The softmax losses ``ntxent``, ``supcon``, ``task_contrastive`` and ``clip`` have two implementations, and the
caller chooses by ``block_size``, the same on every backend: ``None`` (the default) for the plain one, the whole
similarity matrix at once, differentiated by JAX autodiff; an int for the tiled one, which visits the matrix in
``[block_size, block_size]`` tiles and never holds it whole (memory O(block_size² + N·dim)), with a hand-derived
gradient sweep over the tiles (a ``custom_jvp``, so forward mode works too). Both read one definition of the
per-row math. ``matmul_dtype=jnp.bfloat16`` gives bf16 similarity products accumulated in float32.
``sharded_loss(..., loss=losses.supcon)`` (or ``all_gather_loss`` / ``ring_loss`` inside ``jax.shard_map``)
computes one of them over a batch sharded across devices, negatives from every device; it takes the loss
function itself.

Bad input raises a one-line ``ValueError`` at trace time: wrong shapes or dtypes, zero-width embeddings, a
concrete temperature or margin that is not finite and > 0. What only run time knows (a traced temperature's
sign, NaN or inf in the embeddings, a non-finite result) is checked in the checked mode alone:
``losses.checked(jax.jit(step))(...)`` raises on the first failed check, naming the loss and the argument;
without it those checks are not traced at all and a traced τ <= 0 gives NaN or a meaningless value silently.
"""

from mtcl_jax.losses._clip import clip, sigmoid_pairwise
from mtcl_jax.losses._common import checked
from mtcl_jax.losses._infonce import binary_infonce
from mtcl_jax.losses._margin import margin_contrastive, triplet_margin
from mtcl_jax.losses._ntxent import ntxent, supcon, task_contrastive
from mtcl_jax.losses._sharded import all_gather_loss, ring_loss, sharded_loss

__all__ = (
    "all_gather_loss",
    "binary_infonce",
    "checked",
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
