"""softmax, log_softmax and logsumexp as drop-ins for jax.nn: the same calls, the same answers.

What jax's own tests check for these functions (``tests/nn_test.py``: the softmax tests;
``tests/lax_scipy_test.py``: the logsumexp tests), checked here against ``jax.nn`` and
``scipy.special.logsumexp`` on the same inputs: every ``axis`` form, ``b`` with broadcasting and
negative or zero entries, ``keepdims``, ``return_sign``, ``where``, integer and complex inputs,
empty arrays, scalars, ``+inf`` and NaN, gradients of every order, and reverse-mode residuals no
larger than jax.nn's. The one documented difference, a row with nothing included (0 or ``-inf``
and a zero gradient where jax.nn gives NaN), is checked as a difference.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax._src.ad_checkpoint import saved_residuals
from jax.test_util import check_grads

import jsoftmax as jsm

NORMALIZERS = {
    "softmax": (jsm.softmax, jax.nn.softmax),
    "log_softmax": (jsm.log_softmax, jax.nn.log_softmax),
    "logsumexp": (jsm.logsumexp, jax.nn.logsumexp),
}
AXES = [-1, 0, 1, (0, 2), (2, 0), (-1, -3), None, ()]


def _x(shape, seed=0, scale=3.0, dtype=np.float32):
    return np.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


# ------------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("name", list(NORMALIZERS))
def test_every_axis_and_where_form_matches_jax_nn_in_value_and_gradient(name):
    ours, theirs = NORMALIZERS[name]
    x = _x((3, 4, 5))
    x[0, 1, 2] = -np.inf  # an included -inf entry
    full = np.random.default_rng(1).random(x.shape) > 0.25
    wheres = {"none": None, "full": full, "lower rank": full[:1, :, 0:1]}
    cases = list(itertools.product(AXES, wheres))
    cot = _x(x.shape, seed=2)

    def run(fn, x):
        outs = []
        for axis, w in cases:
            out, pull = jax.vjp(lambda x, axis=axis, w=w: fn(x, axis=axis, where=wheres[w]), x)
            ct = jnp.ones_like(out) if out.shape != x.shape else jnp.asarray(cot)
            outs.append((out, pull(ct)[0]))
        return outs

    got = jax.jit(lambda x: run(ours, x))(x)
    with jax.numpy_rank_promotion("allow"):
        want = jax.jit(lambda x: run(theirs, x))(x)
    for (axis, w), (v, g), (v_ref, g_ref) in zip(cases, got, want, strict=True):
        msg = f"{name} axis={axis} where={w}"
        assert v.shape == v_ref.shape and v.dtype == v_ref.dtype, msg
        v, g, v_ref, g_ref = map(np.asarray, (v, g, v_ref, g_ref))
        # jax.nn gives NaN for a row with nothing included; jsoftmax gives 0 / -inf there
        # (tested below). Elsewhere the values agree, and jsoftmax has no NaN at all.
        assert not np.isnan(v).any() and not np.isnan(g).any(), msg
        ok = ~np.isnan(v_ref)
        np.testing.assert_allclose(v[ok], v_ref[ok], rtol=2e-6, atol=2e-6, err_msg=msg)
        ok = ~np.isnan(g_ref)
        np.testing.assert_allclose(g[ok], g_ref[ok], rtol=2e-5, atol=2e-6, err_msg=msg)


def _lse_cases():
    """jax's logsumexp test matrix: compatible shapes of a and b, every axis, with and without
    b; (keepdims, return_sign) cycles through its four values from case to case."""
    groups = [[(4,), (3, 4)], [(3, 1), (1, 4)], [(2, 3, 4), (2, 1, 4)]]
    flags = itertools.cycle(itertools.product([False, True], repeat=2))
    cases = []
    for group in groups:
        for use_b in (False, True):
            for shapes in itertools.product(group, repeat=2 if use_b else 1):
                ndim = max(len(s) for s in shapes)
                for axis in range(-ndim, ndim):
                    keepdims, return_sign = next(flags)
                    cases.append((shapes, axis, keepdims, return_sign))
    return cases


LSE_DTYPES = {  # dtype -> (rtol against scipy in float64, every k-th case: compile time)
    "float32": (2e-6, 2),
    "float64": (1e-14, 7),
    "bfloat16": (1e-2, 7),
    "complex64": (2e-6, 7),
    "int32": (2e-6, 7),
}


@pytest.mark.parametrize("dtype", list(LSE_DTYPES))
def test_logsumexp_matches_scipy_and_jax_nn_for_b_keepdims_return_sign(dtype, request):
    rtol, every = LSE_DTYPES[dtype]
    if dtype == "float64":
        request.getfixturevalue("x64")
    cases = _lse_cases()[::every]
    rng = np.random.default_rng(3)
    args = []
    for shapes, *_ in cases:
        arrays = [rng.normal(size=s) * 3 for s in shapes]
        if dtype == "complex64":
            arrays = [a + 1j * rng.normal(size=a.shape) for a in arrays]
        args.append([np.asarray(a, dtype) if dtype != "int32" else np.round(a) for a in arrays])
        if dtype == "int32":
            args[-1] = [a.astype(np.int32) for a in args[-1]]

    def run(fn, args):
        outs = []
        for (_, axis, keepdims, return_sign), arrays in zip(cases, args, strict=True):
            b = arrays[1] if len(arrays) == 2 else None
            outs.append(fn(arrays[0], axis, b=b, keepdims=keepdims, return_sign=return_sign))
        return outs

    got = jax.jit(lambda a: run(jsm.logsumexp, a))(args)
    with jax.numpy_rank_promotion("allow"):
        want = jax.jit(lambda a: run(jax.nn.logsumexp, a))(args)
    for (shapes, axis, keepdims, return_sign), arrays, g, w in zip(
        cases, args, got, want, strict=True
    ):
        msg = f"{dtype} shapes={shapes} axis={axis} keepdims={keepdims} sign={return_sign}"
        wide = np.complex128 if dtype == "complex64" else np.float64
        a64 = np.asarray(arrays[0], wide)
        b = None if len(arrays) == 1 else np.asarray(arrays[1], wide)
        with np.errstate(all="ignore"):
            exact = scipy.special.logsumexp(
                a64, axis, b=b, keepdims=keepdims, return_sign=return_sign
            )
            # With signed b the sum cancels: its condition number |b| e^a / |b e^a| scales the
            # error any rounding of the terms leaves in log|sum| (float32 inputs are exact).
            cond = 1.0
            if b is not None:
                size = scipy.special.logsumexp(a64.real, axis, b=np.abs(b), keepdims=keepdims)
                lse = scipy.special.logsumexp(a64, axis, b=b, keepdims=keepdims, return_sign=True)
                cond = np.exp(size - lse[0])
        well = np.broadcast_to(cond < 1 / rtol, np.shape(exact[0] if return_sign else exact))
        for k, (ours, theirs, ref) in enumerate(
            zip(*(v if return_sign else (v,) for v in (g, w, exact)), strict=True)
        ):
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, msg
            ours, theirs, ref = (np.asarray(v).astype(wide) for v in (ours, theirs, ref))
            if k == 1:  # the sign, where the sum is not lost in its rounding (complex: z/|z|)
                np.testing.assert_allclose(ours[well], ref[well], rtol=rtol, err_msg=msg)
                continue
            tol = rtol * (np.abs(ref) + cond)
            ok = np.isfinite(ref) & np.isfinite(ours) & np.isfinite(theirs)
            assert np.array_equal(np.isnan(ours)[well], np.isnan(ref)[well]), msg
            assert np.array_equal(np.isinf(ours)[well], np.isinf(ref)[well]), msg
            with np.errstate(invalid="ignore"):  # inf - inf outside `ok`
                assert np.all(np.abs(ours - ref)[ok] <= tol[ok]), (msg, ours, ref, tol)
                # jax.nn: within the same bound of the exact value (it rounds the terms too)
                assert np.all(np.abs(theirs - ref)[ok] <= 10 * tol[ok]), (msg, theirs, ref)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5])
def test_logsumexp_with_where_is_logsumexp_of_the_selected_entries(size):
    rng = np.random.default_rng(size)
    x = _x((size,), seed=size)
    mask = rng.random(size) > 0.5
    expected = scipy.special.logsumexp(x[mask]) if mask.any() else -np.inf
    np.testing.assert_allclose(jsm.logsumexp(x, where=mask), expected, rtol=1e-6)


def test_logsumexp_with_where_has_the_gradient_of_the_selected_entries():
    x = jnp.array([0.0, 0.0, 0.0, 0.0, 100.0])
    g = jax.grad(lambda x: jsm.logsumexp(x, where=jnp.arange(5) < 4))(x)
    np.testing.assert_array_equal(g, [0.25, 0.25, 0.25, 0.25, 0.0])


def test_logsumexp_gradients_with_b_match_jax_nn(x64):
    a = jnp.asarray(_x((3, 4), seed=4, dtype=np.float64))
    b = jnp.asarray(_x((4,), seed=5, dtype=np.float64)).at[1].set(0.0)

    def f(fn):
        def lse(a, b):
            with jax.numpy_rank_promotion("allow"):  # jax.nn broadcasts b implicitly
                out, sign = fn(a, axis=-1, b=b, return_sign=True)
            return jnp.sum(out * sign)

        return lse

    g = jax.jit(jax.grad(f(jsm.logsumexp), (0, 1)))(a, b)
    want = jax.jit(jax.grad(f(jax.nn.logsumexp), (0, 1)))(a, b)
    for g_arg, want_arg in zip(g, want, strict=True):
        np.testing.assert_allclose(g_arg, want_arg, rtol=1e-12, atol=1e-14)
    b = b.at[1].set(0.5)  # away from b = 0, where jax.nn's b-gradient is 0 by convention
    lse = jax.jit(lambda a, b: jsm.logsumexp(a, -1, b=b, return_sign=True)[0])
    check_grads(lse, (a, b), order=2)


# ------------------------------------------------------------------------------ edge values


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_empty_array_gives_the_empty_array(name):
    x = jnp.array([], dtype=jnp.float32)
    for fn in NORMALIZERS[name]:
        out = fn(x)
        assert out.shape == (0,) and out.dtype == x.dtype
    assert jsm.softmax(jnp.zeros((2, 0))).shape == (2, 0)


def test_logsumexp_of_empty_axes_is_minus_inf_with_sign_zero():
    for shape, axis in [((2, 0), -1), ((2, 0), None), ((0, 3), -1), ((0,), None)]:
        got = jsm.logsumexp(jnp.zeros(shape), axis, return_sign=True)
        want = jax.nn.logsumexp(jnp.zeros(shape), axis, return_sign=True)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("name", list(NORMALIZERS))
def test_scalars_and_empty_axis_tuples_are_answered_as_jax_nn(name):
    ours, theirs = NORMALIZERS[name]
    for x in (jnp.float32(1.5), jnp.asarray(_x((2, 3)))):
        for axis in (None, ()):
            np.testing.assert_allclose(ours(x, axis=axis), theirs(x, axis=axis), rtol=1e-7)
    with pytest.raises(ValueError, match="^axis: -1 is out of range for an array of rank 0"):
        ours(jnp.float32(1.5), axis=-1)
    with pytest.raises(ValueError):
        theirs(jnp.float32(1.5), axis=-1)


def test_logsumexp_of_plus_inf_is_plus_inf_and_nan_stays_nan():
    # scipy and jax.nn: log(1 + e^inf) = inf. It used to be NaN (inf - inf inside).
    rows = [[1.0, np.inf], [-np.inf, np.inf], [np.inf, np.inf], [np.inf, np.nan], [np.nan, 1.0]]
    x = jnp.asarray(rows)
    want = [np.inf, np.inf, np.inf, np.nan, np.nan]
    for fn in (jsm.logsumexp, jax.jit(jsm.logsumexp, static_argnums=1)):
        np.testing.assert_array_equal(fn(x, -1), want)
        np.testing.assert_array_equal(fn(x, -1), jax.nn.logsumexp(x, -1))
    np.testing.assert_array_equal(jsm.logsumexp(jnp.array([1.0, jnp.inf])), np.inf)
    # the gradient: 0 for the finite entries, NaN at +inf (jax.nn's in jax 0.10; from jax 0.11
    # jax.nn's is NaN at every entry of such a row)
    g = jax.grad(jsm.logsumexp)(jnp.array([1.0, jnp.inf]))
    np.testing.assert_array_equal(g, [0.0, np.nan])
    # softmax and log_softmax of a +inf row are NaN, as in jax.nn
    for name in ("softmax", "log_softmax"):
        ours, theirs = NORMALIZERS[name]
        np.testing.assert_array_equal(ours(x[:3]), theirs(x[:3]))


@pytest.mark.parametrize("name", list(NORMALIZERS))
def test_a_row_with_nothing_included_is_the_documented_difference(name):
    # jax.nn: NaN in value and gradient; jsoftmax: softmax 0, log_softmax and logsumexp -inf, and
    # a zero gradient.
    # (jax.nn.logsumexp's value is -inf there too; its gradient is NaN.)
    ours, theirs = NORMALIZERS[name]
    x = jnp.array([[1.0, 2.0, 3.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
    out, peer = ours(x, axis=-1), theirs(x, axis=-1)
    want = 0.0 if name == "softmax" else -np.inf
    np.testing.assert_array_equal(out[1], want)
    assert np.isnan(peer[1]).all() or name == "logsumexp" and peer[1] == -np.inf
    np.testing.assert_allclose(out[0], peer[0], rtol=1e-6)

    def total(fn):
        return lambda x: jnp.sum(_finite(fn(x, axis=-1)))

    np.testing.assert_array_equal(jax.grad(total(ours))(x)[1], 0.0)
    assert np.isnan(jax.grad(total(theirs))(x)[1]).all()


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_where_mask_equals_the_selected_entries(name):
    ours, _ = NORMALIZERS[name]
    x = jnp.array([5.5, 1.3, -4.2, 0.9])
    m = jnp.array([True, False, True, True])
    out = ours(x, where=m)
    np.testing.assert_allclose(out[m], ours(x[m]), rtol=1e-6)
    probs = out if name == "softmax" else jnp.exp(out)
    np.testing.assert_allclose(jnp.sum(probs), 1.0, rtol=1e-6)
    empty = ours(x, where=jnp.zeros(4, bool))
    np.testing.assert_array_equal(empty, 0.0 if name == "softmax" else -np.inf)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_masked_huge_logit_has_zero_gradient_jax_19490(name):
    x = jnp.array([36.0, 10000.0])
    g = jax.grad(lambda x: NORMALIZERS[name][0](x, where=x < 1000)[0])(x)
    np.testing.assert_array_equal(g, [0.0, 0.0])


@pytest.mark.parametrize("name", list(NORMALIZERS))
def test_integer_and_complex_inputs_are_answered_as_jax_nn(name):
    ours, theirs = NORMALIZERS[name]
    for x in (
        jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
        jnp.asarray(_x((2, 3)) + 1j * _x((2, 3), seed=1), jnp.complex64),
    ):
        got, want = ours(x, axis=-1), theirs(x, axis=-1)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    z = jnp.array([1 + 1j, 2 - 1j, -2 + 3j], jnp.complex64)
    if name == "logsumexp":
        lse, sign = jsm.logsumexp(z, return_sign=True)
        total = np.exp(np.asarray(z, np.complex128)).sum()
        assert lse.dtype == jnp.float32 and sign.dtype == jnp.complex64
        np.testing.assert_allclose(sign, total / abs(total), rtol=1e-6)
        np.testing.assert_allclose(sign * np.exp(lse), total, rtol=1e-6)


def test_logsumexp_special_cases_of_jax_and_scipy():
    # jax #5370: b = 0 drops its entry (integer a and b are promoted to float, as in jax.nn).
    a, b = np.array([-1000, -2]), np.array([1, 0])
    np.testing.assert_allclose(jsm.logsumexp(a, b=b), scipy.special.logsumexp(a, b=b))
    # jax #7390: no infinity inside for ordinary inputs.
    with jax.debug_infs(True):
        np.testing.assert_allclose(jsm.logsumexp(np.ones(4, np.float32)), np.log(4) + 1, 1e-6)
    # jax #7634: no NaN inside for a scalar, with and without b.
    with jax.debug_nans(True), jax.disable_jit():
        assert jsm.logsumexp(1.0) == 1.0
        assert jsm.logsumexp(1.0, b=1.0) == 1.0
    # a negative sum: NaN without return_sign, (log|sum|, -1) with it; an exact cancellation
    # is -inf with sign 0.
    a, b = jnp.array([1.0, 2.0]), jnp.array([1.0, -1.0])
    assert np.isnan(jsm.logsumexp(a, b=b))
    lse, sign = jsm.logsumexp(a, b=b, return_sign=True)
    np.testing.assert_allclose(lse, np.log(np.e**2 - np.e), rtol=1e-6)
    assert sign == -1
    np.testing.assert_array_equal(
        jsm.logsumexp(jnp.ones(2), b=jnp.array([1.0, -1.0]), return_sign=True), (-np.inf, 0.0)
    )


def test_logsumexp_with_b_keeps_the_digits_of_the_plain_logsumexp():
    # b = 1 (or a power of two) leaves the max entry out of the sum as the plain logsumexp does:
    # log(1 + 2e-20) = 2e-20, where log(sum) gives 0.
    a = np.array([0.0, -46.0, -46.0], np.float32)
    exact = np.log1p(2 * np.exp(np.float64(-46.0)))
    np.testing.assert_allclose(jsm.logsumexp(a, b=np.ones(3, np.float32)), exact, rtol=1e-6)
    np.testing.assert_allclose(jsm.logsumexp(a), exact, rtol=1e-6)
    assert jax.nn.logsumexp(a, b=np.ones(3, np.float32)) == 0.0
    # terms that cancel exactly leave the rest: log(e^2 - e^2 + e^0) = 0
    got = jsm.logsumexp(np.float32([2.0, 2.0, 0.0]), b=np.float32([1.0, -1.0, 1.0]))
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


# ---------------------------------------------------------------------- derivatives and memory


def _finite(out):
    return jnp.where(jnp.isfinite(out), out, 0.0)  # log_softmax is -inf where excluded


@pytest.mark.parametrize("name", list(NORMALIZERS))
def test_derivatives_of_every_order_match_jax_nn(name, x64):
    ours, theirs = NORMALIZERS[name]
    x = jnp.asarray(_x((2, 3, 4), seed=6, dtype=np.float64))
    mask = np.random.default_rng(7).random(x.shape) > 0.3
    mask[:, 0, :] = mask[0, :, 0] = True  # no row without an included entry
    for axis, where in [(1, None), (1, jnp.asarray(mask)), ((0, 2), jnp.asarray(mask))]:

        def scalar(fn, axis=axis, where=where):
            return lambda x: jnp.sum(jnp.sin(_finite(fn(x, axis=axis, where=where))))

        f, g = scalar(ours), scalar(theirs)
        transforms = [jax.grad, jax.hessian]
        if where is None and name == "log_softmax":  # third order
            transforms.append(lambda h: jax.jacfwd(jax.hessian(h)))
        for transform in transforms:
            np.testing.assert_allclose(
                jax.jit(transform(f))(x), jax.jit(transform(g))(x), rtol=1e-9, atol=1e-10
            )
    # jvp and vjp against finite differences, to second order
    masked = jax.jit(lambda x: _finite(ours(x, 1, where=jnp.asarray(mask))))
    check_grads(masked, (x,), order=2)


@pytest.mark.parametrize("custom_jvp", [False, True], ids=["jax-softmax-jvp-off", "on"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(NORMALIZERS))
def test_reverse_mode_residuals_are_no_larger_than_jax_nn(name, dtype, custom_jvp):
    # jax.softmax_custom_jvp (off by default in jax 0.10, on from 0.11) decides what
    # jax.nn.softmax keeps: its output only when on. Both settings, on every jax.
    ours, theirs = NORMALIZERS[name]
    x = jnp.asarray(_x((4, 6, 8)), dtype)
    full = jnp.asarray(np.random.default_rng(8).random(x.shape) > 0.3)
    cases = itertools.product([-1, 1, (0, 2), None], [None, full, full[0, 0]])
    with jax.softmax_custom_jvp(custom_jvp):
        _check_residuals(ours, theirs, name, x, cases)


def _check_residuals(ours, theirs, name, x, cases):
    for axis, where in cases:

        def ours_fn(x, where, axis=axis):
            return ours(x, axis, where=where)

        def theirs_fn(x, where, axis=axis):
            return theirs(x, axis, where=where)

        mine = saved_residuals(ours_fn, x, where)
        with jax.numpy_rank_promotion("allow"):
            peer = saved_residuals(theirs_fn, x, where)
        size = sum(a.size * a.dtype.itemsize for a, _ in mine)
        peer_size = sum(a.size * a.dtype.itemsize for a, _ in peer)
        msg = f"{name} axis={axis} where={None if where is None else where.shape}: {mine}"
        assert size <= peer_size, msg
        # at most one array of the input's size and dtype, besides `where` itself
        big = [a for a, _ in mine if a.shape == x.shape and a.dtype == x.dtype]
        assert len(big) <= 1, msg
