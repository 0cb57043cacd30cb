"""lavie_jax.runtime.xla_cpu: the XLA:CPU options the entry points set, only where they are known to exist."""

import os

import jax
import numpy as np

from lavie_jax.runtime import xla_cpu


def test_adds_the_option_for_a_tested_jaxlib_and_keeps_the_users_flags():
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    assert xla_cpu.configure(env, version=(0, 10)) == "--xla_backend_optimization_level=0 " + xla_cpu.YNN_OFF
    assert xla_cpu.configure(env, version=(0, 10)) == env["XLA_FLAGS"]  # idempotent
    empty = {}
    assert xla_cpu.configure(empty, version=(0, 10)) == xla_cpu.YNN_OFF


def test_a_users_own_value_wins():
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert xla_cpu.configure(env, version=(0, 10)) == "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_reads_the_installed_jaxlib_version():
    from importlib import metadata

    assert xla_cpu.jaxlib_version() == tuple(int(v) for v in metadata.version("jaxlib").split(".")[:2])


def test_untested_jaxlib_versions_get_nothing():
    """XLA aborts on a flag it does not know: outside the measured versions nothing is set."""
    for version in ((0, 9), (0, 11), (1, 0)):
        env = {}
        assert xla_cpu.configure(env, version=version) == "" and "XLA_FLAGS" not in env


def test_this_process_runs_with_the_flags_the_entry_points_set():
    """The suite's processes carry the same options (tests/conftest.py), and this jaxlib accepts them: a
    convolution compiles and runs."""
    for flag in xla_cpu.cpu_flags():
        assert flag in os.environ["XLA_FLAGS"].split()
    x = jax.numpy.ones((1, 6, 6, 3))
    y = jax.lax.conv_general_dilated(x, jax.numpy.ones((3, 3, 3, 2)), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert float(np.asarray(y)[0, 2, 2, 0]) == 27.0


def test_run_once_options_compile_here_and_keep_cpu_options_off_other_backends():
    options = xla_cpu.run_once_options("cpu")
    assert options["xla_backend_optimization_level"] == 0
    assert ("xla_cpu_use_fusion_emitters" in options) == xla_cpu.is_tested_jaxlib()
    assert xla_cpu.run_once_options("tpu") == xla_cpu.run_once_options("gpu") == {"xla_backend_optimization_level": 0}
    f = jax.jit(lambda k: jax.random.normal(k, (4, 3)) * 2.0)
    key = jax.random.key(1)
    np.testing.assert_array_equal(f.lower(key).compile(options)(key), f(key))  # accepted, and the same values
