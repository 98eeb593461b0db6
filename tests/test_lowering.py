"""Every public function lowers for the accelerators, and carries no CPU-only construct there.

``jax.export(..., platforms=[p])`` lowers a program for a platform that this machine does not
have (no plugin is needed), picking the portable branch of every ``platform_dependent``. For
each public function (its value, and ``value_and_grad`` or ``grad`` where it is
differentiable), in float32 and bfloat16, the module exported for ``cuda``, ``rocm`` and ``tpu``
must exist and must not contain what only XLA:CPU's formulation uses (an
``optimization_barrier``) or any custom call (a LAPACK routine, a host callback) beyond
sharding annotations.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.experimental import checkify

import jsoftmax as jsm

PLATFORMS = ("cuda", "rocm", "tpu")
DTYPES = ("float32", "bfloat16")
ROWS, CLASSES, HIDDEN = 4, 384, 8  # three 128-class blocks: CPU takes its block path here
# What only the CPU formulation uses. A CPU-only library call or host callback would be a custom
# call outside the list below.
CPU_ONLY = ("stablehlo.optimization_barrier",)
# Custom calls that any platform's runtime resolves (sharding annotations and the like).
PORTABLE_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


def _logits(dtype):
    return jax.ShapeDtypeStruct((ROWS, CLASSES), jnp.dtype(dtype))


def _int_labels():
    return jax.ShapeDtypeStruct((ROWS,), jnp.int32)


def _mean(fn):
    return lambda *a: jnp.mean(fn(*a))


def _programs(dtype) -> dict[str, tuple]:
    """name -> (function, argument shapes): every public function, value and derivative."""
    z, y = _logits(dtype), _int_labels()
    x = jax.ShapeDtypeStruct((ROWS, HIDDEN), jnp.dtype(dtype))
    w = jax.ShapeDtypeStruct((HIDDEN, CLASSES), jnp.dtype(dtype))
    out = {}
    for name in ("softmax", "log_softmax", "logsumexp", "softmax_jacobian"):
        fn = getattr(jsm, name)
        out[name] = (fn, (z,))
        out[f"grad {name}"] = (jax.grad(lambda v, fn=fn: jnp.sum(fn(v)).astype(jnp.float32)), (z,))
    for name in ("cross_entropy", "fused_cross_entropy"):
        fn = getattr(jsm, name)
        for kind, labels in (("int", y), ("soft", z)):
            options = {"label_smoothing": 0.1, "z_loss": 1e-4} if kind == "int" else {}
            loss = functools.partial(fn, reduction="mean", **options)
            out[f"{name} {kind}"] = (loss, (z, labels))
            out[f"value_and_grad {name} {kind}"] = (jax.value_and_grad(loss), (z, labels))
    for name, labels in (
        ("softmax_cross_entropy", z),
        ("softmax_cross_entropy_with_integer_labels", y),
    ):
        if hasattr(jsm, name):  # the optax drop-ins
            fn = _mean(getattr(jsm, name))
            out[name] = (fn, (z, labels))
            out[f"value_and_grad {name}"] = (jax.value_and_grad(fn), (z, labels))
    head = functools.partial(jsm.linear_cross_entropy, chunk_size=2)
    out["linear_cross_entropy"] = (head, (x, w, y))
    out["value_and_grad linear_cross_entropy"] = (jax.value_and_grad(head, (0, 1)), (x, w, y))
    # check_labels has no derivative; under jit it runs inside checkify.
    out["check_labels"] = (checkify.checkify(lambda v: jsm.check_labels(v, CLASSES)), (y,))
    return out


@functools.cache
def _module(name: str, dtype: str, platform: str) -> str:
    fn, args = _programs(dtype)[name]
    return export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


NAMES = sorted(_programs("float32"))


def test_every_public_function_is_covered():
    # jsm.testing.check_vjp runs derivatives eagerly: it is a tool, not a program to lower.
    public = {n for n in jsm.__all__ if callable(getattr(jsm, n))}
    covered = {word for name in NAMES for word in name.split()}
    assert public <= covered, public - covered


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_exports_for_accelerator_without_cpu_only_constructs(name, dtype, platform):
    text = _module(name, dtype, platform)
    for construct in CPU_ONLY:
        assert construct not in text, f"{name} ({dtype}) for {platform} contains {construct}"
    targets = set(re.findall(r"call_target_name\s*=\s*\"([^\"]+)\"", text))
    assert targets <= PORTABLE_CUSTOM_CALLS, f"{name} ({dtype}) for {platform}: {targets}"


def test_cpu_export_carries_the_tuned_formulation():
    # The check above would be vacuous if no program ever held a barrier: the CPU one does.
    assert "optimization_barrier" in _module(
        "value_and_grad fused_cross_entropy int", "float32", "cpu"
    )
