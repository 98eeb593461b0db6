"""Every public function under ``jax.numpy_dtype_promotion("strict")``, for every floating dtype.

Strict promotion refuses any implicit promotion between different dtypes, so a library that
works under it never mixes dtypes by accident (``jnp.promote_types(bfloat16, float32)`` inside
used to make every function raise ``TypePromotionError`` for float16, bfloat16 and float64).
Each function and its reverse-mode derivative run under ``jit`` for every dtype, and eagerly too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jsoftmax as jsm

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _inputs(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 4)), dtype)
    mask = jnp.asarray([[True, True, False, True], [True, True, True, True]])
    soft = jnp.asarray(rng.dirichlet(np.ones(4), size=2), dtype)
    labels = jnp.asarray([0, 3])
    h = jnp.asarray(rng.normal(size=(2, 3)), dtype)
    w = jnp.asarray(rng.normal(size=(3, 4)), dtype)
    return x, mask, soft, labels, h, w


def _calls(dtype):
    """name -> (function of one differentiable array, that array): every public function."""
    x, mask, soft, labels, h, w = _inputs(dtype)
    loss = {"label_smoothing": 0.1, "z_loss": 1e-3}
    return {
        "softmax": (lambda x: jsm.softmax(x, where=mask), x),
        "log_softmax": (lambda x: jsm.log_softmax(x, axis=(0, 1), where=mask), x),
        "logsumexp": (lambda x: jsm.logsumexp(x, axis=-1, where=mask), x),
        "logsumexp b": (lambda x: jsm.logsumexp(x, b=x, return_sign=True)[0], x),
        "softmax_jacobian": (jsm.softmax_jacobian, x),
        "cross_entropy int": (lambda x: jsm.cross_entropy(x, labels, where=mask, **loss), x),
        "cross_entropy float": (lambda x: jsm.cross_entropy(x, soft, **loss), x),
        "fused_cross_entropy int": (
            lambda x: jsm.fused_cross_entropy(x, labels, where=mask, **loss),
            x,
        ),
        "fused_cross_entropy float": (lambda x: jsm.fused_cross_entropy(x, soft, **loss), x),
        "softmax_cross_entropy": (lambda x: jsm.softmax_cross_entropy(x, soft, -1, mask), x),
        "softmax_cross_entropy_with_integer_labels": (
            lambda x: jsm.softmax_cross_entropy_with_integer_labels(x, labels, where=mask[:, 0]),
            x,
        ),
        "linear_cross_entropy": (lambda h: jsm.linear_cross_entropy(h, w, labels, **loss), h),
        "check_labels": (lambda x: x * jsm.check_labels(labels, 4)[0].astype(x.dtype), x),
    }


def test_every_public_function_is_called():
    assert {name.split(" ")[0] for name in _calls("float32")} == set(jsm.__all__) - {"testing"}


def _value_and_vjp(fn, x):
    out, pullback = jax.vjp(fn, x)
    return out, pullback(jnp.ones_like(out))[0]


@pytest.fixture
def strict(request):
    """Strict promotion, with x64 on for float64."""
    with jax.enable_x64(request.node.callspec.params["dtype"] == "float64"):
        with jax.numpy_dtype_promotion("strict"):
            yield


def _check(name, x, out, grad):
    assert not np.isnan(np.asarray(out, np.float64)).any(), name
    if grad is not None:
        assert grad.dtype == x.dtype, name
        assert np.all(np.isfinite(np.asarray(grad, np.float64))), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_public_function_and_its_gradient_work_under_strict_promotion_in_jit(dtype, strict):
    calls = _calls(dtype)

    @checkify.checkify  # check_labels' checkify.check under jit
    @jax.jit
    def run(xs):
        return {name: _value_and_vjp(fn, xs[name]) for name, (fn, _) in calls.items()}

    err, results = run({name: x for name, (_, x) in calls.items()})
    err.throw()
    for name, (out, grad) in results.items():
        _check(name, calls[name][1], out, grad)


# Eagerly every primitive compiles apart (seconds per dtype, more with gradients), and the dtype
# checks happen while tracing, as under jit, where the gradients are traced above: the values of
# float64 and of the 16-bit path (bfloat16) run here.
@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_every_public_function_works_eagerly_under_strict_promotion(dtype, strict):
    for name, (fn, x) in _calls(dtype).items():
        _check(name, x, fn(x), None)
