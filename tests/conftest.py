"""Strict JAX for the whole suite, as equinox and lineax do.

Eight simulated CPU devices are requested before JAX starts, so the sharding tests need no
accelerator; on a machine with a real accelerator the flag only affects the host platform.
"""

import os

# Where the CUDA plugin is installed on a machine without a GPU (the gpu-aot extra, for the
# deviceless compiles of tests/test_accelerators.py), its version check cannot pass and the
# plugin would not register at all.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The test modules that take longest on one worker, longest first (about 65 s down to 25 s on 2
# CPU cores, jax 0.10.2); the others follow in collection order.
LONGEST_FIRST = (
    "test_linear.py",
    "test_wide_rows.py",
    "test_jax_nn_compat.py",
    "test_campaign.py",
    "test_edges.py",
    "test_sharding.py",
    "test_optax_compat.py",
    "test_bad_inputs.py",
    "test_losses.py",
    "test_normalizers.py",
    "test_accuracy.py",
    "test_strict_dtypes.py",
    "test_check_vjp.py",
    "test_experiments.py",
)


def pytest_configure(config):
    """Under pytest-xdist (``-n 2`` in pyproject's addopts), send each test module to one worker.

    Most of the suite's time is XLA compiling programs that the tests of a module share: the
    primitives its eager tests dispatch on its shapes, its module-scoped fixtures (the experiment
    runs) and cached single-device results. xdist's default ``load`` splits every module over
    both workers, so each worker compiles them again; ``loadscope`` compiles them once. The
    modules go out longest first (see ``pytest_collection_modifyitems``), so that both workers
    finish at about the same time.
    """
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadscope"
        config.option.loadscopereorder = False  # keep the order below, not xdist's by test count


def pytest_collection_modifyitems(config, items):
    """On xdist workers, order the modules longest first (a module's tests keep their order)."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="module", params=["native", "portable"])
def formulation(request):
    """Run a test on both formulations of every op: the backend's own ("native": on CPU, the
    one tuned for XLA:CPU) and the portable one that GPU and TPU programs carry, forced here.

    Module-scoped, so pytest runs a module's tests of one formulation together and JAX's caches
    are cleared once per switch (``force_portable`` clears them), not once per test.
    """
    from jsoftmax._platform import force_portable

    with force_portable(request.param == "portable"):
        yield request.param


@pytest.fixture
def x64():
    """Run a test with float64 enabled (for float64 oracles and finite differences)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    import jax.numpy as jnp

    import jsoftmax

    doctest_namespace.update(jnp=jnp, jax=jax, jsm=jsoftmax)
