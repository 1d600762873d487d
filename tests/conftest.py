"""Test set-up: 8 host CPU devices for the cross-replica tests, quiet TF."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

# Compiles dominate the suite on 2 cores: skip most XLA optimisations (numerics
# are compared within the same setting) and share identical programs across tests.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "SEMPPL_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "semppl_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"


@pytest.fixture(autouse=True, scope="session")
def _hide_gpus_from_tf():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
