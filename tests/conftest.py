"""Shared test setup: eight forced CPU devices and the offline data fixtures."""

import os

# Must be set before jax is imported anywhere: tests of sharded code run on an
# 8-device CPU mesh, and everything else runs on device 0 as usual.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# transformers (parity references only) must not import its TensorFlow side: that
# needs tf-keras with the installed Keras 3.
os.environ.setdefault("USE_TF", "0")

import pytest  # pylint: disable=g-import-not-at-top

from elm_jax.data import fetch  # pylint: disable=g-import-not-at-top


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: long-running; excluded by default, run with `pytest -m slow`.")


@pytest.fixture(scope="session")
def bigbench_dir():
  """The fetched BIG-bench task folder (fetched on first use, then cached)."""
  return fetch.ensure("bigbench")


@pytest.fixture(scope="session")
def promptsource_dir():
  """The fetched promptsource templates folder."""
  return fetch.ensure("promptsource")


@pytest.fixture(scope="session")
def minilm_dir():
  """The fetched all-MiniLM-L6-v2 model folder."""
  return fetch.ensure("minilm")
