"""Test-wide JAX settings: 8 simulated CPU devices, strict promotion rules.

These must run before any JAX computation, which is why they live here at import time.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
