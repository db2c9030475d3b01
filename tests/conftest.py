"""Test-wide JAX settings: simulated CPU devices, strict promotion rules, and the ``devices`` marker.

The number of simulated CPU devices is ``$MTCL_TEST_DEVICES`` (default 1). It must be set before JAX starts a
backend, so it is one number per pytest process: every jitted program compiles for that many devices, which is
why the default is 1 and only the multi-device tier asks for 8.

A test that needs several devices says so with ``@pytest.mark.devices(8)`` (a module with ``pytestmark``); with
fewer devices it is skipped, naming the command that runs it. The multi-device tier selects the marked tests:

    MTCL_TEST_DEVICES=8 python -m pytest -q -n 2 -m devices

``@pytest.mark.devices(1)`` marks a test that runs on any device count and belongs in that tier too (the smoke
run: the trainer on every device it finds).

Compilation: the suite compiles hundreds of small programs and runs most of them once, so XLA's CPU backend
spends more time optimising their machine code (LLVM) than running it. ``MTCL_TEST_FAST_COMPILE=1`` asks XLA for
its cheapest code generation (``--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true``,
added to ``$XLA_FLAGS``): the same HLO programs, ~25% less CPU per compile. It is off by default because it is
not the code users run: with it, a GradVac step of the smoke config turns NaN at step 2
(``test_a_method_chosen_on_the_command_line_trains_and_resumes_with_its_state``), which XLA's default optimisation
does not.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
FAST_COMPILE_ENV = "MTCL_TEST_FAST_COMPILE"
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if os.environ.get(FAST_COMPILE_ENV, "0") == "1" and FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  # Set before JAX starts; inherited by the subprocesses some tests start (resume, multi-host).
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

# JAX's persistent compilation cache, for every program however quick to compile: most of the suite's time is
# XLA compiling small programs (eager flax initialisation compiles one per primitive and shape), the two xdist
# workers compile many of the same ones, and a second run (the next tier, the next edit) loads them instead. The
# cache key is the program, the compile options and the JAX/XLA versions, so the code that runs is what XLA
# would compile anyway. MTCL_TEST_COMPILATION_CACHE names the folder; "0" turns it off.
CACHE_ENV = "MTCL_TEST_COMPILATION_CACHE"
_default_cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mtcl_jax",
                              "test-compilation-cache")
COMPILATION_CACHE = os.environ.get(CACHE_ENV, _default_cache)
if COMPILATION_CACHE not in ("", "0"):
  # Environment variables, so the subprocesses some tests start (CLI runs, multi-host) share the cache.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", COMPILATION_CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import pytest  # noqa: E402

DEVICES_ENV = "MTCL_TEST_DEVICES"
MULTI_DEVICE_COMMAND = f"{DEVICES_ENV}=8 python -m pytest -q -n 2 -m devices"

jax.config.update("jax_num_cpu_devices", int(os.environ.get(DEVICES_ENV, "1")))
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_runtest_setup(item):
  marker = item.get_closest_marker("devices")
  if marker is not None and jax.device_count() < marker.args[0]:
    # Raised here, so that -ra folds every such skip into one line.
    pytest.skip(f"needs {marker.args[0]} devices, {DEVICES_ENV} gives {jax.device_count()}; "
                f"the multi-device tier runs it: {MULTI_DEVICE_COMMAND}")
