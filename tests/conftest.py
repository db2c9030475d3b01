"""Test-wide JAX settings: simulated CPU devices, strict promotion rules, and the ``devices`` marker.

The number of simulated CPU devices is ``$MTCL_TEST_DEVICES`` (default 1). It must be set before JAX starts a
backend, so it is one number per pytest process: every jitted program compiles for that many devices, which is
why the default is 1 and only the multi-device tier asks for 8.

A test that needs several devices says so with ``@pytest.mark.devices(8)`` (a module with ``pytestmark``); with
fewer devices it is skipped, naming the command that runs it. The multi-device tier selects the marked tests:

    MTCL_TEST_DEVICES=8 python -m pytest -q -n 2 -m devices

``@pytest.mark.devices(1)`` marks a test that runs on any device count and belongs in that tier too (the smoke
run: the trainer on every device it finds).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
