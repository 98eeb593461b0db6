"""One test per edge bullet of the loss contract, for both the reference and the fused loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoftmax as jsm

# Every test runs on both formulations (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("formulation")

LOSSES = {"reference": jsm.cross_entropy, "fused": jsm.fused_cross_entropy}
TRANSFORMS = {"eager": lambda f: f, "jit": jax.jit}
INF = jnp.inf


def value_and_grad(fn, logits, labels, transform=jax.jit, **kw):
    """The loss and the gradient of its sum, both computed through ``transform``: by default one
    jitted program (eagerly, every primitive of the loss and its gradient compiles on its own)."""

    def total(z):
        return jnp.sum(fn(z, labels, **kw))

    return transform(lambda z: (fn(z, labels, **kw), jax.grad(total)(z)))(logits)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_zero_weight_on_neg_inf_logit_contributes_nothing(loss):
    # 0 * log 0 = 0
    logits = jnp.array([[-INF, 1.0, 2.0], [-INF, 0.0, -INF]])
    labels = jnp.array([[0.0, 0.5, 0.5], [0.0, 1.0, 0.0]])
    val, grad = value_and_grad(LOSSES[loss], logits, labels)
    a, expect = jax.jit(lambda z: (jax.nn.softmax(z), -(0.5 * jnp.log(jax.nn.softmax(z))).sum()))(
        jnp.array([1.0, 2.0])
    )
    np.testing.assert_allclose(val, [expect, 0.0], atol=1e-7)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[0], [0.0, a[0] - 0.5, a[1] - 0.5], rtol=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_optax_zero_times_log_zero_vectors(loss):
    # optax's vectors for 0 * log 0: -inf logits with zero target weight. Its
    # safe_softmax_cross_entropy gives 0 there; its softmax_cross_entropy gives NaN.
    logits = jnp.array([[-INF, 0.0], [0.0, -INF], [-INF, 1.0]])
    labels = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    # One jitted program for ours, optax's two losses and our gradient.
    val, safe, unsafe, grad = jax.jit(
        lambda z: (
            LOSSES[loss](z, labels),
            optax.safe_softmax_cross_entropy(z, labels),
            optax.softmax_cross_entropy(z, labels),
            jax.grad(lambda z: jnp.sum(LOSSES[loss](z, labels)))(z),
        )
    )(logits)
    np.testing.assert_allclose(val, [0.0, 0.0, 0.0], atol=0)
    np.testing.assert_allclose(val, safe, atol=1e-7)
    assert np.all(np.isnan(unsafe))
    np.testing.assert_array_equal(grad, jnp.zeros_like(logits))


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("kind", ["int", "float"])
def test_positive_weight_on_included_neg_inf_logit_is_plus_inf(loss, kind):
    logits = jnp.array([[-INF, 1.0, 2.0]])
    labels = jnp.array([0]) if kind == "int" else jnp.array([[0.5, 0.5, 0.0]])
    assert jax.jit(LOSSES[loss])(logits, labels)[0] == INF


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("how", ["all_excluded", "all_neg_inf"])
def test_row_with_nothing_included_gives_zero_loss_and_zero_grad(loss, how, transform):
    logits = jnp.array([[1.0, 2.0, 3.0], [4.0, 1e30, 6.0]])
    kw = {"z_loss": 0.1, "label_smoothing": 0.1}
    if how == "all_excluded":
        kw["where"] = jnp.array([[True, True, True], [False, False, False]])
    else:
        logits = logits.at[1].set(-INF)
    for labels in (jnp.array([0, 1]), jnp.array([[1.0, 0, 0], [0.2, 0.3, 0.5]])):
        val, grad = value_and_grad(LOSSES[loss], logits, labels, TRANSFORMS[transform], **kw)
        assert val[1] == 0.0 and val[0] > 0
        assert np.all(np.asarray(grad[1]) == 0) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("bad", [3, -1, 99, "excluded"])
def test_bad_integer_label_gives_nan_in_its_row_only(loss, bad, transform):
    logits = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.1, -1.0], [2.0, 2.0, 0.0]])
    kw = {}
    if bad == "excluded":
        kw["where"] = jnp.array([[True, True, True], [True, False, True], [True, True, True]])
        labels = jnp.array([0, 1, 2])
    else:
        labels = jnp.array([0, bad, 2])
    keep = jnp.array([1.0, 0.0, 1.0])
    good_labels = labels.at[1].set(0)

    def value_grad_and_good(z):
        # The value, its gradient, and the gradient with a valid label in row 1 (whose rows 0
        # and 2 the bad label must not change): eagerly, or one jitted program.
        return (
            LOSSES[loss](z, labels, **kw),
            jax.grad(lambda z: jnp.sum(LOSSES[loss](z, labels, **kw)))(z),
            jax.grad(lambda z: jnp.sum(LOSSES[loss](z, good_labels, **kw) * keep))(z),
        )

    val, grad, good = map(np.asarray, TRANSFORMS[transform](value_grad_and_good)(logits))
    assert np.isnan(val[1]) and np.all(np.isfinite(val[[0, 2]]))
    included = np.asarray(kw["where"][1]) if "where" in kw else np.ones(3, bool)
    assert np.all(np.isnan(grad[1][included])) and np.all(grad[1][~included] == 0)
    assert np.all(np.isfinite(grad[[0, 2]]))
    np.testing.assert_allclose(grad[[0, 2]], good[[0, 2]], rtol=1e-6)
    # optax, for contrast, wraps -1 to the last class or gives a finite, wrong gradient
    if bad == -1:
        optax_rows = TRANSFORMS[transform](optax.softmax_cross_entropy_with_integer_labels)
        assert np.isfinite(optax_rows(logits, labels)[1])


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nan_in_one_example_never_changes_another(loss, reduction):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 5)).astype(np.float32))
    labels = jnp.array([0, 1, 2, 3])
    poisoned = logits.at[2, 1].set(jnp.nan)

    # One compiled program (per-example values and the gradient), run on both inputs.
    @jax.jit
    def values_and_grads(z):
        grad = jax.grad(lambda z: jnp.sum(LOSSES[loss](z, labels, reduction=reduction)))(z)
        return LOSSES[loss](z, labels), grad

    (v_clean, g_clean), (v_bad, g_bad) = values_and_grads(logits), values_and_grads(poisoned)
    g_clean, g_bad = np.asarray(g_clean), np.asarray(g_bad)
    assert np.all(np.isnan(g_bad[2]))
    rows = [0, 1, 3]
    np.testing.assert_array_equal(g_bad[rows], g_clean[rows])
    if reduction == "none":
        v_clean, v_bad = np.asarray(v_clean), np.asarray(v_bad)
        np.testing.assert_array_equal(v_bad[rows], v_clean[rows])


@pytest.mark.parametrize("loss", list(LOSSES))
def test_ignore_index_gives_zero_loss_zero_grad_and_leaves_the_mean(loss):
    logits = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.1, -1.0], [2.0, 2.0, 0.0]])
    labels = jnp.array([0, -100, 2])
    val, grad = value_and_grad(LOSSES[loss], logits, labels, ignore_index=-100)
    assert val[1] == 0 and np.all(np.asarray(grad[1]) == 0)
    mean, val2 = jax.jit(
        lambda z: (
            LOSSES[loss](z, labels, ignore_index=-100, reduction="mean"),
            LOSSES[loss](z, jnp.array([0, 1, 2]), ignore_index=1),
        )
    )(logits)
    np.testing.assert_allclose(mean, (val[0] + val[2]) / 2, rtol=1e-6)
    # ignore_index inside [0, C) is honoured too
    assert val2[1] == 0


@pytest.mark.parametrize("loss", list(LOSSES))
def test_mean_over_zero_examples_is_zero_with_zero_grad(loss):
    logits = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.1, -1.0]])
    labels = jnp.array([-100, -100])
    f = lambda z: LOSSES[loss](z, labels, ignore_index=-100, reduction="mean")  # noqa: E731
    val, grad = jax.jit(jax.value_and_grad(f))(logits)
    assert val == 0 and np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_ignore_index_with_float_labels_raises(loss):
    with pytest.raises(ValueError, match="^ignore_index"):
        LOSSES[loss](jnp.zeros((2, 3)), jnp.zeros((2, 3)), ignore_index=-100)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_excluded_classes_get_zero_probability_zero_grad_and_their_target_is_ignored(loss):
    logits = jnp.array([[1.0, 50.0, 2.0]])
    mask = jnp.array([[True, False, True]])
    labels = jnp.array([[0.3, 0.9, 0.7]])  # weight on the excluded class is ignored
    val, grad = value_and_grad(LOSSES[loss], logits, labels, where=mask)
    expect = jax.jit(optax.softmax_cross_entropy)(jnp.array([[1.0, 2.0]]), jnp.array([[0.3, 0.7]]))
    np.testing.assert_allclose(val, expect, rtol=1e-6)
    assert grad[0, 1] == 0


@pytest.mark.parametrize("loss", list(LOSSES))
def test_label_smoothing_spreads_over_included_finite_classes(loss):
    eps = 0.3
    logits = jnp.array([[1.0, 2.0, -INF, 0.5]])
    mask = jnp.array([[True, True, True, False]])
    val = jax.jit(lambda z: LOSSES[loss](z, jnp.array([1]), where=mask, label_smoothing=eps))(
        logits
    )

    # K = 2 (class 2 has a -inf logit, class 3 is excluded)
    @jax.jit
    def expected(z):
        logp = jax.nn.log_softmax(z)
        return -((1 - eps) * logp[1] + eps / 2 * (logp[0] + logp[1]))

    expect = expected(jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(val[0], expect, rtol=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_label_smoothing_without_mask_equals_torch_formula(loss):
    # torch.nn.functional.cross_entropy(label_smoothing=eps): (1 - eps) * nll + eps * mean(-logp)
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    eps = 0.25
    # One jitted program: jax.nn's log-probabilities, our per-example and mean losses.
    logp, val, mean = jax.jit(
        lambda z, y: (
            jax.nn.log_softmax(z),
            LOSSES[loss](z, y, label_smoothing=eps),
            LOSSES[loss](z, y, label_smoothing=eps, reduction="mean"),
        )
    )(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    logp = np.asarray(logp).astype(np.float64)
    expect = -(1 - eps) * logp[np.arange(6), labels] - eps * logp.mean(-1)
    np.testing.assert_allclose(val, expect, rtol=1e-5)
    np.testing.assert_allclose(mean, expect.mean(), rtol=1e-5)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_z_loss_adds_c_times_logsumexp_squared(loss):
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))
    labels = jnp.array([0, 1, 3])
    base, with_z, lse = jax.jit(
        lambda z: (
            LOSSES[loss](z, labels),
            LOSSES[loss](z, labels, z_loss=0.1),
            jax.nn.logsumexp(z, -1),
        )
    )(logits)
    np.testing.assert_allclose(with_z - base, 0.1 * lse**2, rtol=1e-5)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction,shape", [("none", (2, 3)), ("sum", ()), ("mean", ())])
def test_reduction_shapes(loss, reduction, shape):
    out = LOSSES[loss](jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), reduction=reduction)
    assert out.shape == shape
    labels = jnp.zeros((2, 3), jnp.int32)
    out = LOSSES[loss](jnp.zeros((2, 4, 3)), labels, axis=1, reduction=reduction)
    assert out.shape == shape


@pytest.mark.parametrize("loss", list(LOSSES))
def test_soft_labels_need_not_sum_to_one(loss):
    logits = jnp.array([[1.0, 2.0, 3.0]])
    labels = jnp.array([[0.5, 1.0, 1.5]])
    val, grad = value_and_grad(LOSSES[loss], logits, labels)
    want_grad, want_val = jax.jit(
        lambda z: (jax.nn.softmax(z) * 3.0 - labels, -(labels * jnp.log(jax.nn.softmax(z))).sum())
    )(logits)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(val, want_val, rtol=1e-6)


def test_confident_loss_keeps_its_digits_where_optax_returns_zero():
    logits = jnp.array([[20.0, 0.0, 0.0]])
    labels = jnp.array([0])
    # One jitted program: optax's loss, both of ours and the fused gradient. (The doctests of
    # jsm.cross_entropy and jsm.fused_cross_entropy make the eager calls on this row.)
    peer, ours, g = jax.jit(
        lambda z: (
            optax.softmax_cross_entropy_with_integer_labels(z, labels),
            [fn(z, labels) for fn in LOSSES.values()],
            jax.grad(lambda z: jsm.fused_cross_entropy(z, labels)[0])(z),
        )
    )(logits)
    assert peer[0] == 0.0
    exact = np.log1p(2 * np.exp(-20.0))  # 4.1223e-9
    for loss in ours:
        np.testing.assert_allclose(loss[0], exact, rtol=1e-6)
    np.testing.assert_allclose(g[0], [-exact, np.exp(-20.0), np.exp(-20.0)], rtol=1e-6)


def test_check_labels_raises_eagerly_and_through_checkify_under_jit():
    from jax.experimental import checkify

    good = jnp.array([0, 2, -100])
    np.testing.assert_array_equal(jsm.check_labels(good, 3, ignore_index=-100), good)
    with pytest.raises(Exception, match="labels: 1 label"):
        jsm.check_labels(jnp.array([0, 3]), 3)
    err, out = checkify.checkify(jax.jit(lambda y: jsm.check_labels(y, 3)))(jnp.array([0, -1, 7]))
    assert "labels: 2 label(s) outside [0, 3)" in err.get() and "bad label -1" in err.get()
    err, out = checkify.checkify(jax.jit(lambda y: jsm.check_labels(y, 3)))(jnp.array([0, 1]))
    assert err.get() is None
    np.testing.assert_array_equal(out, [0, 1])


@pytest.mark.parametrize("loss", list(LOSSES))
def test_nan_logit_on_the_only_class_excluded_is_an_empty_row(loss):
    # The excluded NaN does not exist: the row has nothing included (loss 0, gradient 0), even
    # though the label names that class. Found by the campaign on the portable formulation.
    z = jnp.asarray([[jnp.nan, 1.0]], jnp.float32)
    where = jnp.asarray([[False, False]])
    value, grad = value_and_grad(LOSSES[loss], z, jnp.asarray([0]), where=where)
    np.testing.assert_array_equal(value, [0.0])
    np.testing.assert_array_equal(grad, [[0.0, 0.0]])


@pytest.mark.parametrize(("transform", "classes"), [("eager", 2), ("jit", 2), ("jit", 3002)])
def test_logsumexp_of_a_plus_inf_row_is_plus_inf_unless_it_holds_a_nan(transform, classes):
    # Each formulation has its own +inf check; XLA:CPU's fused max can drop a NaN in a wide
    # row, so the NaN is looked for explicitly on both.
    rows = np.zeros((6, classes), np.float32)
    rows[0, :2] = [1.0, INF]
    rows[1, :2] = [np.nan, INF]
    rows[2, :2] = [INF, np.nan]
    rows[3, :2] = [np.nan, 1.0]
    rows[4, :2] = [INF, INF]
    rows[5, :2] = [1.0, 2.0]
    got = TRANSFORMS[transform](lambda x: jsm.logsumexp(x, axis=-1))(jnp.asarray(rows))
    want = jax.nn.logsumexp(jnp.asarray(rows[5]))
    np.testing.assert_array_equal(np.asarray(got[:5]), [INF, np.nan, np.nan, np.nan, INF])
    np.testing.assert_allclose(got[5], want, rtol=1e-6)
    # the same along the leading axis (the rows transposed)
    got_t = TRANSFORMS[transform](lambda x: jsm.logsumexp(x, axis=0))(jnp.asarray(rows.T))
    np.testing.assert_array_equal(np.asarray(got_t[:5]), [INF, np.nan, np.nan, np.nan, INF])
