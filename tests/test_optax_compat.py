"""softmax_cross_entropy and softmax_cross_entropy_with_integer_labels as drop-ins for optax.

What optax's own tests check for these two functions (``optax/losses/_classification_test.py``:
fixed values, scalar and batched calls, per-logit and per-example ``where``, gradients, ``axis``
ints and tuples, consistency of the two), checked here against optax on the same inputs, plus
the dtypes optax returns. Forward mode is not checked: both are ``custom_vjp`` functions (the
fused loss); :func:`jsoftmax.cross_entropy` is the one with forward mode. The differences where
optax's answer is an accident of its formulation are checked as differences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jsoftmax as jsm

LOGITS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], np.float32)
TARGETS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
LABELS = np.array([1, 0], np.int32)
EXPECTED = np.array([9.00013, 3.0696733], np.float32)  # optax's test values
PAIRS = {
    "float": (jsm.softmax_cross_entropy, optax.losses.softmax_cross_entropy),
    "int": (
        jsm.softmax_cross_entropy_with_integer_labels,
        optax.losses.softmax_cross_entropy_with_integer_labels,
    ),
}


def _labels(kind):
    return TARGETS if kind == "float" else LABELS


@pytest.mark.parametrize("kind", list(PAIRS))
def test_fixed_values_scalar_and_batched_eagerly_and_under_jit(kind):
    ours, _ = PAIRS[kind]
    for fn in (ours, jax.jit(ours)):
        np.testing.assert_allclose(fn(LOGITS, _labels(kind)), EXPECTED, atol=1e-4)
        np.testing.assert_allclose(fn(LOGITS[0], _labels(kind)[0]), EXPECTED[0], atol=1e-4)


def _to_rows(a, axes):
    """``a`` (the logits' layout) as [batch..., classes] with the class axes flattened."""
    batch = [i for i in range(a.ndim) if i not in axes]
    moved = np.transpose(a, batch + list(axes))
    return moved.reshape(moved.shape[: len(batch)] + (-1,))


def _from_rows(r, shape, axes):
    batch = [i for i in range(len(shape)) if i not in axes]
    perm = batch + list(axes)
    return np.transpose(r.reshape(tuple(shape[i] for i in perm)), np.argsort(perm))


def _random_case(kind, shape, axes, seed=0):
    """Logits of ``shape`` and labels for the class ``axes``: integer ids or distributions."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape) * 2).astype(np.float32)
    rows = _to_rows(logits, axes)
    if kind == "int":
        return logits, rng.integers(0, rows.shape[-1], size=rows.shape[:-1]).astype(np.int32)
    targets = rng.dirichlet(np.ones(rows.shape[-1]), size=rows.shape[:-1]).astype(np.float32)
    return logits, _from_rows(targets, shape, axes)


CASES = [  # (shape, class axes): optax's test_axis and test_axes
    ((4, 5, 6), (0,)),
    ((4, 5, 6), (1,)),
    ((4, 5, 6), (2,)),
    ((2, 3, 4, 5), (1, 3)),
    ((2, 3, 4, 5), (3, 2)),
    ((2, 3, 4, 5), (0, 1, 3)),
]


@pytest.mark.parametrize("kind", list(PAIRS))
def test_values_and_gradients_match_optax_for_int_and_tuple_axes_and_where(kind):
    ours, theirs = PAIRS[kind]
    rng = np.random.default_rng(1)
    args = []
    for variant in ("plain", "per-logit where", "per-example where"):
        for shape, axes in CASES:
            logits, labels = _random_case(kind, shape, axes)
            where = None
            if variant == "per-logit where":
                where = rng.random(shape) > 0.3
                if kind == "int":
                    # optax's integer loss of a label on an excluded class is not a loss (a
                    # difference, tested below): keep the labels' classes included
                    rows = _to_rows(where, axes)
                    np.put_along_axis(rows, labels[..., None], True, -1)
                    where = _from_rows(rows, shape, axes)
            elif variant == "per-example where":
                where = (
                    rng.random(labels.shape if kind == "int" else _to_rows(logits, axes).shape[:-1])
                    > 0.3
                )
            args.append((logits, labels, axes[0] if len(axes) == 1 else axes, where))

    def run(fn, arrays):
        outs = []
        for (logits, labels), (_, _, axis, where) in zip(arrays, args, strict=True):

            def loss(z, y, axis=axis, where=where):
                return fn(z, y, axis=axis, where=where)

            if kind == "float":
                out, pull = jax.vjp(loss, logits, labels)
            else:
                out, pull = jax.vjp(lambda z, loss=loss, y=labels: loss(z, y), logits)
            outs.append((out, pull(jnp.ones_like(out))))
        return outs

    arrays = [(logits, labels) for logits, labels, _, _ in args]
    got = jax.jit(functools.partial(run, ours))(arrays)
    with jax.numpy_rank_promotion("allow"):
        want = jax.jit(functools.partial(run, theirs))(arrays)
    for k, ((out, grads), (out_ref, grads_ref)) in enumerate(zip(got, want, strict=True)):
        where = args[k][3]
        msg = f"{kind} case {k}: axis {args[k][2]}, where {None if where is None else where.shape}"
        assert out.shape == out_ref.shape and out.dtype == out_ref.dtype, msg
        np.testing.assert_allclose(out, out_ref, rtol=2e-6, atol=2e-6, err_msg=msg)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            g, g_ref = np.asarray(g), np.asarray(g_ref)
            assert np.isfinite(g).all(), msg
            ok = np.isfinite(g_ref)  # optax leaks NaN from rows with nothing included
            np.testing.assert_allclose(g[ok], g_ref[ok], rtol=2e-5, atol=2e-6, err_msg=msg)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_per_logit_mask_rows_with_nothing_included_are_zero(kind):
    ours, _ = PAIRS[kind]
    where = np.array([[1, 0, 0], [0, 0, 0]], bool)
    labels = TARGETS if kind == "float" else np.array([0, 0], np.int32)
    out = ours(LOGITS, labels, where=where)
    assert out[1] == 0 and np.isfinite(out[0])


@pytest.mark.parametrize("kind", list(PAIRS))
def test_reverse_mode_gradients_pass_check_grads_and_stay_finite_under_a_mask(kind, x64):
    ours, _ = PAIRS[kind]
    logits = jnp.asarray(LOGITS, jnp.float64)
    if kind == "float":
        check_grads(ours, (logits, jnp.asarray(TARGETS, jnp.float64)), order=1, modes=["rev"])
    else:
        check_grads(lambda z: ours(z, LABELS), (logits,), order=1, modes=["rev"])
    g = jax.grad(lambda z: jnp.sum(ours(z, _labels(kind), where=np.array([True, False]))))(logits)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g[1]) == 0)


@pytest.mark.parametrize("size", [5, 10])
def test_a_one_dimensional_mask_equals_the_loss_on_the_selected_classes(size):
    rng = np.random.default_rng(size)
    preds = rng.normal(size=size).astype(np.float32)
    targets = rng.dirichlet(np.ones(size)).astype(np.float32)
    for mask in (rng.integers(2, size=size).astype(bool), np.zeros(size, bool)):
        x = jsm.softmax_cross_entropy(preds[mask], targets[mask])  # no class at all: 0
        y = jsm.softmax_cross_entropy(preds, targets, where=mask)
        np.testing.assert_allclose(x, y, atol=1e-6)
        optax_x = optax.losses.softmax_cross_entropy(preds[mask], targets[mask])
        np.testing.assert_allclose(x, optax_x, rtol=1e-6)


def test_integer_labels_are_one_hot_float_labels():
    one_hot = jax.nn.one_hot(LABELS, 3)
    np.testing.assert_allclose(
        jsm.softmax_cross_entropy_with_integer_labels(LOGITS, LABELS),
        jsm.softmax_cross_entropy(LOGITS, one_hot),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        jsm.softmax_cross_entropy_with_integer_labels(LOGITS[0], LABELS[0]),
        jsm.softmax_cross_entropy(LOGITS[0], one_hot[0]),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "axis", [(1, 3), (3, 2), (2, 3), (-3, -1), (-1, -2), (-2, -1), (0, 1, 3), (-4, -3, -1)]
)
def test_several_class_axes_are_one_flattened_axis_indexed_by_the_labels(axis):
    shape = (2, 3, 4, 5)
    axes = tuple(a % 4 for a in axis)
    logits, labels = _random_case("int", shape, axes, seed=2)
    flat = _to_rows(logits, axes)
    fn = jsm.softmax_cross_entropy_with_integer_labels
    np.testing.assert_array_equal(fn(logits, labels, axis), fn(flat, labels))
    np.testing.assert_allclose(
        fn(logits, labels, axis),
        optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels, axis),
        rtol=1e-6,
    )
    # the same for the fused loss and the reference, which the drop-ins are built on
    for loss in (jsm.fused_cross_entropy, jsm.cross_entropy):
        np.testing.assert_allclose(loss(logits, labels, axis), loss(flat, labels), rtol=1e-6)


@pytest.mark.parametrize(
    "logits_dtype,labels_dtype",
    [
        ("bfloat16", "bfloat16"),
        ("bfloat16", "float32"),
        ("float32", "bfloat16"),
        ("float16", "int32"),
    ],
)
def test_result_dtypes_are_optax_ones(logits_dtype, labels_dtype):
    logits = jnp.asarray(LOGITS, logits_dtype)
    if labels_dtype == "int32":
        pairs = [(PAIRS["int"], LABELS)]
    else:
        pairs = [(PAIRS["float"], jnp.asarray(TARGETS, labels_dtype))]
    for (ours, theirs), labels in pairs:
        out, ref = ours(logits, labels), theirs(logits, labels)
        assert out.dtype == ref.dtype
        # the exact loss rounded once to the result dtype
        exact = theirs(
            jnp.asarray(logits, jnp.float32),
            jnp.asarray(labels).astype(jnp.float32 if labels_dtype != "int32" else jnp.int32),
        )
        np.testing.assert_array_equal(out, exact.astype(out.dtype))
        g = jax.grad(
            lambda z, ours=ours, labels=labels: jnp.sum(ours(z, labels)).astype(jnp.float32)
        )(logits)
        assert g.dtype == logits.dtype


def test_documented_differences_from_optax():
    z = jnp.array([[-jnp.inf, 0.0, 1.0], [0.5, -1.0, 0.0]])
    # 0 · log 0 = 0: a zero target on a -inf logit adds nothing (optax: NaN)
    soft = jnp.array([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    assert np.isnan(optax.losses.softmax_cross_entropy(z, soft)[0])
    assert np.isfinite(jsm.softmax_cross_entropy(z, soft)).all()
    ints = jsm.softmax_cross_entropy_with_integer_labels
    optax_ints = optax.losses.softmax_cross_entropy_with_integer_labels
    logits = jnp.asarray(LOGITS)
    # a negative label wraps around in optax; here it is outside [0, C): NaN for its example
    assert np.isfinite(optax_ints(logits, jnp.array([-1, 0]))[0])
    out = ints(logits, jnp.array([-1, 0]))
    assert np.isnan(out[0]) and np.isfinite(out[1])
    # a label on a class excluded by where: optax gives a finite loss (it can be negative);
    # NaN here
    where = jnp.array([[True, False, True], [True, True, True]])
    assert np.isfinite(optax_ints(logits, LABELS, where=where)[0])
    z = jnp.array([0.0, 5.0, 0.0])
    assert optax_ints(z, jnp.array(1), where=jnp.array([True, False, True])) < 0
    out = ints(logits, LABELS, where=where)
    assert np.isnan(out[0]) and np.isfinite(out[1])
    # a +inf logit: NaN here, as for the float labels; optax's integer loss gives +inf
    inf = logits.at[0, 0].set(jnp.inf)
    assert optax_ints(inf, LABELS)[0] == jnp.inf
    assert np.isnan(ints(inf, LABELS)[0])


def test_cross_entropy_and_fused_take_axis_and_where_positionally():
    logits, labels = _random_case("float", (3, 4), (1,))
    where = np.array([True, True, False, True])
    for loss in (jsm.cross_entropy, jsm.fused_cross_entropy):
        np.testing.assert_array_equal(
            loss(logits, labels, -1, where), loss(logits, labels, axis=-1, where=where)
        )
        np.testing.assert_array_equal(
            loss(logits.T, labels.T, 0, where[:, None]), loss(logits, labels, -1, where)
        )
