"""The normalizers (softmax, log_softmax, logsumexp, softmax_jacobian): jax.nn parity, edges."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoftmax as jsm
from tests import oracle

NORMALIZERS = {
    "softmax": (jsm.softmax, jax.nn.softmax),
    "log_softmax": (jsm.log_softmax, jax.nn.log_softmax),
    "logsumexp": (
        jsm.logsumexp,
        lambda x, axis, where=None: jax.nn.logsumexp(x, axis, where=where),
    ),
}


def _x(shape=(3, 4, 5), seed=0, scale=3.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("name", list(NORMALIZERS))
def test_normalizer_matches_jax_nn(name, axis, transform):
    ours, theirs = NORMALIZERS[name]
    x = _x()
    # jax.nn rounds log-probabilities near 0 to an absolute (not relative) 1e-7: compare loosely
    # there, and tightly against the float64 oracle.
    got = transform(lambda x: ours(x, axis=axis))(x)
    np.testing.assert_allclose(got, theirs(x, axis=axis), rtol=2e-6, atol=1e-6)
    if name == "log_softmax":
        exact = np.moveaxis(oracle.log_softmax(np.moveaxis(np.asarray(x), axis, -1)), -1, axis)
        np.testing.assert_allclose(got, exact, rtol=1e-6)
    mask = jnp.asarray(np.random.default_rng(1).random(x.shape) > 0.3)
    np.testing.assert_allclose(
        transform(lambda x: ours(x, axis=axis, where=mask))(x),
        theirs(x, axis=axis, where=mask),
        rtol=2e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("name", list(NORMALIZERS))
def test_normalizer_grads_match_jax_nn_and_check_grads(name, x64):
    ours, theirs = NORMALIZERS[name]
    x = _x(seed=2).astype(jnp.float64)
    mask = jnp.asarray(np.random.default_rng(3).random(x.shape) > 0.2)
    check_grads(lambda x: ours(x, axis=1, where=mask), (x,), order=2, modes=["fwd", "rev"])
    cot = _x(shape=np.shape(ours(x, axis=1)), seed=4).astype(jnp.float64)
    _, vjp_ours = jax.vjp(lambda x: ours(x, axis=1), x)
    _, vjp_theirs = jax.vjp(lambda x: theirs(x, axis=1), x)
    np.testing.assert_allclose(vjp_ours(cot)[0], vjp_theirs(cot)[0], rtol=1e-12, atol=1e-13)


def test_log_softmax_matches_float64_oracle_on_wide_range():
    x = _x(shape=(64, 33), seed=5, scale=1e3)
    # compared with the exact value rounded to float32; XLA flushes subnormal results to 0
    exact = oracle.log_softmax(np.asarray(x)).astype(np.float32)
    np.testing.assert_allclose(jsm.log_softmax(x), exact, rtol=1e-6, atol=np.finfo(np.float32).tiny)


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_jacobian_equals_jacfwd_and_closed_form(axis):
    x = _x(shape=(4, 6), seed=6)

    # One jitted program: the Jacobian, and jacfwd and softmax of each row (eagerly, every
    # primitive of every transformation compiles on its own).
    @jax.jit
    def run(x):
        xm = jnp.moveaxis(x, axis, -1)
        rows = [xm[b] for b in range(xm.shape[0])]
        autos = [jax.jacfwd(jsm.softmax)(row) for row in rows]
        return jsm.softmax_jacobian(x, axis=axis), xm, autos, [jsm.softmax(row) for row in rows]

    jac, xm, autos, probs = run(x)
    assert jac.shape == xm.shape + (xm.shape[-1],)
    for b in range(xm.shape[0]):
        np.testing.assert_allclose(jac[b], autos[b], rtol=1e-5, atol=1e-7)
        a = np.asarray(probs[b], np.float64)
        np.testing.assert_allclose(jac[b], np.diag(a) - np.outer(a, a), rtol=1e-5, atol=1e-7)


def test_softmax_jacobian_diagonal_keeps_relative_accuracy_for_confident_rows():
    jac = jsm.softmax_jacobian(jnp.array([30.0, 0.0, 0.0]))
    # a_0 (1 - a_0) = 2 e^-30 to first order; 1 - a_0 computed by subtraction would give 0
    np.testing.assert_allclose(jac[0, 0], 2 * np.exp(-30.0), rtol=1e-6)


@pytest.mark.parametrize("name", list(NORMALIZERS))
def test_excluded_and_neg_inf_entries_get_probability_exactly_zero(name):
    x = jnp.array([[1.0, -jnp.inf, 2.0, 5.0]])
    mask = jnp.array([[True, True, True, False]])
    a = jsm.softmax(x, where=mask)
    assert a[0, 1] == 0 and a[0, 3] == 0
    lp = jsm.log_softmax(x, where=mask)
    assert lp[0, 1] == -jnp.inf and lp[0, 3] == -jnp.inf
    np.testing.assert_allclose(jnp.sum(a), 1.0, rtol=1e-6)


@pytest.mark.parametrize("how", ["masked", "neg_inf"])
def test_fully_masked_row_gives_zeros_neg_inf_and_zero_grad(how):
    x = jnp.array([[1.0, 2.0, 3.0], [0.5, 1e30, 2.0]])
    if how == "masked":
        mask = jnp.array([[True, True, True], [False, False, False]])
    else:
        x = x.at[1].set(-jnp.inf)
        mask = None
    cot = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])

    # One jitted program for the values and the three gradients.
    @jax.jit
    def run(x):
        values = [
            fn(x, axis=-1, where=mask) for fn in (jsm.softmax, jsm.log_softmax, jsm.logsumexp)
        ]
        vjps = [
            jax.vjp(lambda x, fn=fn: fn(x, where=mask), x)[1](cot)[0]
            for fn in (jsm.softmax, jsm.log_softmax)
        ]

        def lse(x):
            return jsm.logsumexp(x, axis=-1, where=mask)

        g = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isfinite(lse(x)), lse(x), 0.0)))(x)
        return values, vjps, g

    (probs, logp, lse), vjps, g = run(x)
    np.testing.assert_array_equal(probs[1], 0.0)
    assert np.all(np.asarray(logp[1]) == -np.inf)
    assert lse[1] == -jnp.inf
    for g_fn in vjps:
        assert np.all(np.isfinite(g_fn)) and np.all(np.asarray(g_fn[1]) == 0)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g[1]) == 0)


def test_masked_huge_logit_gives_zero_gradient_jax_19490():
    # jax #19490: a masked-out huge logit made the gradient NaN through the discarded branch.
    x = jnp.array([1.0, 2.0, 3e38])
    mask = jnp.array([True, True, False])
    for fn in (jsm.softmax, jsm.log_softmax):
        g = jax.grad(lambda x: fn(x, where=mask)[0])(x)  # noqa: B023 (called right here)
        assert np.all(np.isfinite(g)) and g[2] == 0
    g = jax.grad(lambda x: jsm.logsumexp(x, where=mask))(x)
    np.testing.assert_allclose(g, [0.26894143, 0.7310586, 0.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("name", list(NORMALIZERS) + ["softmax_jacobian"])
def test_output_dtype_equals_input_dtype(name, dtype):
    fn = jsm.softmax_jacobian if name == "softmax_jacobian" else NORMALIZERS[name][0]
    x = _x(shape=(2, 5)).astype(dtype)
    out = fn(x)
    assert out.dtype == dtype
    ref = fn(x.astype(jnp.float32))
    np.testing.assert_array_equal(out.astype(np.float32), ref.astype(dtype).astype(np.float32))


def test_logsumexp_keepdims():
    x = _x()
    assert jsm.logsumexp(x, axis=1, keepdims=True).shape == (3, 1, 5)
    np.testing.assert_allclose(jsm.logsumexp(x, axis=1), jax.nn.logsumexp(x, axis=1), rtol=1e-6)


def test_confident_log_softmax_keeps_its_digits_where_jax_nn_returns_zero():
    x = jnp.array([20.0, 0.0, 0.0])
    exact = -2 * np.exp(-20.0) / (1 + 2 * np.exp(-20.0))  # -log1p(2 e^-20), to 1e-17 relative
    assert jax.nn.log_softmax(x)[0] == 0.0
    np.testing.assert_allclose(jsm.log_softmax(x)[0], -np.log1p(2 * np.exp(-20.0)), rtol=1e-6)
    np.testing.assert_allclose(jsm.log_softmax(x)[0], exact, rtol=1e-6)


def test_exact_ties_are_counted_once_each():
    x = jnp.array([3.0, 3.0, 3.0, -40.0])
    np.testing.assert_allclose(jsm.log_softmax(x)[:3], -np.log(3 + np.exp(-43.0)), rtol=1e-7)
    np.testing.assert_allclose(jsm.softmax(x)[:3], 1 / 3, rtol=1e-7)


def test_logsumexp_of_plus_inf_is_plus_inf_as_jax_and_scipy():
    # log(e^1 + e^inf) = inf (jax.nn and scipy); it used to be NaN, from inf - inf inside. A row
    # with a NaN stays NaN.
    x = jnp.array([[1.0, jnp.inf], [-jnp.inf, jnp.inf], [jnp.inf, jnp.inf], [jnp.inf, jnp.nan]])
    for fn in (jsm.logsumexp, jax.jit(jsm.logsumexp, static_argnums=1)):
        np.testing.assert_array_equal(fn(x, -1), [np.inf, np.inf, np.inf, np.nan])
        np.testing.assert_array_equal(fn(x, -1), jax.nn.logsumexp(x, axis=-1))
