"""Tests for jsoftmax.testing.check_vjp: it passes correct rules and flags planted bugs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax as jsm
from jsoftmax.testing import check_vjp, default_tolerance
from jsoftmax.testing._check_vjp import compare_arrays

# ----------------------------------------------------------------------------------------
# A user-style soft-label cross-entropy with a class mask, label smoothing and z-loss: the
# reference is plain autodiff; `make_user_xent` builds a custom_vjp whose backward pass is
# either right or carries one of the planted bugs.


def reference_xent(logits, labels, where, eps, c):
    """Plain-autodiff softmax cross-entropy; `where` marks the included classes."""
    lse = jax.nn.logsumexp(jnp.where(where, logits, -jnp.inf), axis=-1, keepdims=True)
    log_p = jnp.where(where, logits - lse, 0.0)
    k = jnp.sum(where, axis=-1, keepdims=True)
    target = jnp.where(where, (1 - eps) * labels + eps / k, 0.0)
    return -jnp.sum(target * log_p, axis=-1) + c * lse[..., 0] ** 2


def make_user_xent(bug: str | None, where, eps: float, c: float):
    @jax.custom_vjp
    def xent(logits, labels):
        return reference_xent(logits, labels, where, eps, c)

    def fwd(logits, labels):
        lse = jax.nn.logsumexp(jnp.where(where, logits, -jnp.inf), axis=-1, keepdims=True)
        return xent(logits, labels), (logits, labels, lse)

    def bwd(res, g):
        logits, labels, lse = res
        g = g[..., None]
        a = jnp.where(where, jnp.exp(logits - lse), 0.0)
        log_p = jnp.where(where, logits - lse, 0.0)
        num_classes = logits.shape[-1]
        k = jnp.sum(where, axis=-1, keepdims=True)
        spread = eps / num_classes if bug == "smoothing over C" else eps / k
        target = jnp.where(where, (1 - eps) * labels + spread, 0.0)
        total = jnp.sum(target, axis=-1, keepdims=True)
        d_logits = a - target if bug == "a - y" else a * total - target
        if bug != "no z-loss":
            d_logits = d_logits + 2 * c * lse * a
        d_logits = g * d_logits
        if bug == "one element doubled":
            d_logits = d_logits.at[1, 2].multiply(2.0)
        d_labels = -g * (1 - eps) * log_p
        if bug == "labels dropped":
            d_labels = jnp.zeros_like(labels)
        return d_logits, d_labels

    xent.defvjp(fwd, bwd)
    return xent


def xent_inputs(masked: bool = True):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5)) * 2.0, jnp.float32)
    # Soft targets that do not sum to one, as a weighted or partial target would.
    labels = jnp.asarray(rng.uniform(size=(3, 5)) * 0.4, jnp.float32)
    where = np.ones((3, 5), bool)
    if masked:
        where[0, 4] = where[2, 0] = where[2, 3] = False
    return logits, labels, jnp.asarray(where)


PLANTED = [
    # (bug, eps, c, masked, the argument the message must name, a phrase it must contain)
    ("a - y", 0.0, 0.0, False, "argument 0 ('logits')", "of 15 elements out of tolerance"),
    ("labels dropped", 0.0, 0.0, False, "argument 1 ('labels')", "zero everywhere"),
    ("no z-loss", 0.0, 1e-2, False, "argument 0 ('logits')", "fn's VJP:"),
    ("smoothing over C", 0.1, 0.0, True, "argument 0 ('logits')", "fn's VJP:"),
    (
        "one element doubled",
        0.0,
        0.0,
        False,
        "argument 0 ('logits')",
        "worst element: logits[1, 2]",
    ),
]


@pytest.mark.parametrize(
    "bug, eps, c, masked, argument, phrase", PLANTED, ids=[p[0] for p in PLANTED]
)
def test_planted_bug_is_flagged_on_the_right_argument(bug, eps, c, masked, argument, phrase):
    logits, labels, where = xent_inputs(masked)
    fn = make_user_xent(bug, where, eps, c)

    def reference(logits, labels):
        return reference_xent(logits, labels, where, eps, c)

    with pytest.raises(AssertionError) as info:
        check_vjp(fn, reference, logits, labels, argnums=(0, 1))
    message = str(info.value)
    first_line = message.splitlines()[0]
    assert argument in first_line
    assert "jacrev" in first_line
    assert phrase in message
    # The message carries what is needed to find the bug: element, both values, tolerance.
    assert "worst element: " in message and "jacrev:" in message and "tolerance" in message
    other = "argument 1 ('labels')" if "logits" in argument else "argument 0 ('logits')"
    assert other not in message  # the correct argument is not blamed


@pytest.mark.parametrize(
    "transform, eps, c, masked",
    [(lambda f: f, 0.0, 0.0, False), (jax.jit, 0.1, 1e-2, True)],
    ids=["eager-plain", "jit-masked-smoothing-zloss"],
)
def test_correct_user_rule_passes(transform, eps, c, masked):
    logits, labels, where = xent_inputs(masked)
    fn = transform(make_user_xent(None, where, eps, c))
    report = check_vjp(
        fn, lambda z, y: reference_xent(z, y, where, eps, c), logits, labels, argnums=(0, 1)
    )
    assert report["dtype"] == "float32"
    assert set(report["args"]) == {0, 1}
    assert report["args"][0]["name"] == "logits" and report["args"][1]["name"] == "labels"
    for arg in report["args"].values():
        for derivation in ("jacrev", "jacfwd"):
            assert arg[derivation]["passed"]
            assert arg[derivation]["max_abs_error"] < 1e-5


# ----------------------------------------------------------------------------------------
# The library's own fused loss against its reference.

LOSS_OPTIONS = [
    {},
    {
        "where": np.array([True, True, False, True, True]),
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "reduction": "mean",
    },
]


@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=["plain", "where+smoothing+z+mean"])
@pytest.mark.parametrize("kind", ["int", "float"])
def test_fused_cross_entropy_passes_against_cross_entropy(kind, options):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 5)) * 3.0, jnp.float32)
    if kind == "int":
        labels = jnp.asarray([0, 3, 4])
        argnums = 0
    else:
        labels = jnp.asarray(rng.dirichlet(np.ones(5), size=3) * 0.8, jnp.float32)
        argnums = (0, 1)

    def fused(z, y):
        return jsm.fused_cross_entropy(z, y, **options)

    def reference(z, y):
        return jsm.cross_entropy(z, y, **options)

    report = check_vjp(fused, reference, logits, labels, argnums=argnums)
    assert report["value"]["passed"]
    assert all(d["passed"] for a in report["args"].values() for k, d in a.items() if k != "name")


def test_integer_ignore_index_argument_is_passed_through():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)), jnp.float32)
    labels = jnp.asarray([1, -100, 4])
    report = check_vjp(
        lambda z, y: jsm.fused_cross_entropy(z, y, ignore_index=-100, reduction="mean"),
        lambda z, y: jsm.cross_entropy(z, y, ignore_index=-100, reduction="mean"),
        logits,
        labels,
    )
    assert list(report["args"]) == [0]


# ----------------------------------------------------------------------------------------
# Structure: pytree outputs and inputs, integer outputs, bfloat16, values.


def test_pytree_outputs_and_integer_outputs_are_supported():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 5)), jnp.float32)

    def fn(x):
        return {"p": jsm.softmax(x), "lse": jsm.logsumexp(x, -1), "argmax": jnp.argmax(x, -1)}

    def reference(x):
        return {"p": jax.nn.softmax(x), "lse": jax.nn.logsumexp(x, -1), "argmax": jnp.argmax(x, -1)}

    report = check_vjp(jax.jit(fn), reference, x)
    assert report["args"][0]["jacfwd"]["passed"]


def test_pytree_inputs_are_differentiated_leaf_by_leaf():
    rng = np.random.default_rng(3)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    labels = jnp.asarray([2, 0, 4])

    def fused(params, x, labels):
        logits = x @ params["w"] + params["b"][None, :]
        return jsm.fused_cross_entropy(logits, labels, reduction="mean")

    def reference(params, x, labels):
        logits = x @ params["w"] + params["b"][None, :]
        return jsm.cross_entropy(logits, labels, reduction="mean")

    report = check_vjp(fused, reference, params, x, labels, argnums=(0, 1))
    assert report["args"][0]["name"] == "params" and report["args"][1]["name"] == "x"

    # A rule that halves the bias gradient, a leaf inside the first argument.
    @jax.custom_vjp
    def bad_bias(params, x, labels):
        return fused(params, x, labels)

    def bad_fwd(params, x, labels):
        out, vjp = jax.vjp(lambda p, x: fused(p, x, labels), params, x)
        return out, vjp

    def bad_bwd(vjp, g):
        d_params, d_x = vjp(g)
        return {"w": d_params["w"], "b": 0.5 * d_params["b"]}, d_x, None

    bad_bias.defvjp(bad_fwd, bad_bwd)
    with pytest.raises(AssertionError, match=r"params\['b'\]\[\d\]") as info:
        check_vjp(bad_bias, reference, params, x, labels, argnums=(0, 1))
    assert "0.5 times the expected value" in str(info.value)


def test_bfloat16_uses_its_own_tolerance():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 5)) * 3, jnp.bfloat16)
    report = check_vjp(jsm.softmax, lambda x: jax.nn.softmax(x.astype(jnp.float32)), x)
    assert report["dtype"] == "bfloat16"
    assert (report["rtol"], report["atol"]) == default_tolerance(jnp.bfloat16)
    assert report["args"][0]["jacrev"]["passed"]


def test_default_tolerance_loosens_with_machine_epsilon():
    dtypes = [jnp.float64, jnp.float32, jnp.float16, jnp.bfloat16]
    rtols = [default_tolerance(d)[0] for d in dtypes]
    assert rtols == sorted(rtols)


def test_different_forward_values_are_reported_as_such():
    x = jnp.asarray([0.0, 1.0, 2.0])
    with pytest.raises(AssertionError, match="different values") as info:
        check_vjp(lambda x: jnp.sin(x), lambda x: jnp.sin(x) + x * (x > 1.5), x)
    assert "output[2]" in str(info.value)


def test_comparison_flags_nan_against_a_finite_value():
    c = compare_arrays(
        np.array([1.0, np.nan]), np.array([1.0, 2.0]), rtol=1e-6, atol=1e-6, label="g"
    )
    assert not c.passed and c.where == "g[1]" and c.max_abs_error == np.inf
    same = compare_arrays(
        np.array([np.nan, -np.inf]), np.array([np.nan, -np.inf]), rtol=1e-6, atol=1e-6, label="g"
    )
    assert same.passed


@pytest.mark.parametrize(
    "argnums, error, match",
    [
        (1, TypeError, "argnums: argument 1 \\('labels'\\) has dtype int32"),
        (2, ValueError, "argnums: 2 is out of range"),
        ((0, 0), ValueError, "argnums: repeated"),
        ("0", TypeError, "argnums: expected an int"),
    ],
)
def test_bad_argnums_raise_naming_argnums(argnums, error, match):
    logits = jnp.zeros((2, 3))
    labels = jnp.asarray([0, 1], jnp.int32)
    with pytest.raises(error, match=match):
        check_vjp(jsm.fused_cross_entropy, jsm.cross_entropy, logits, labels, argnums=argnums)


def test_non_callable_fn_raises_type_error():
    with pytest.raises(TypeError, match="^fn: "):
        check_vjp(1.0, jnp.sin, jnp.zeros(2))


# ----------------------------------------------------------------------------------------
# Finite differences (float64 only).


def _wrong_softplus():
    """softplus with a custom_jvp that is off by 10%: autodiff of it agrees with itself."""

    @jax.custom_jvp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    @softplus.defjvp
    def _jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return softplus(x), 1.1 * jax.nn.sigmoid(x) * t

    return softplus


@pytest.mark.parametrize("size", [7, 2500], ids=["full", "directional"])
def test_finite_differences_catch_a_rule_autodiff_cannot(x64, size):
    wrong = _wrong_softplus()
    x = jnp.linspace(-3.0, 3.0, size, dtype=jnp.float64)

    def fn(x):
        return jnp.sum(wrong(x))

    # The reference shares the wrong rule, so jacrev and jacfwd of it agree with fn.
    with pytest.raises(AssertionError) as info:
        check_vjp(fn, fn, x)
    message = str(info.value)
    assert "finite-difference" in message.splitlines()[0]
    assert ("along random direction" in message) == (size > 2048)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_finite_differences_pass_with_masked_infinite_outputs(x64, dtype):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 5)), dtype)
    where = jnp.asarray([[True, True, False, True, True], [False] * 5, [True] * 5])

    def reference(x):
        lse = jax.nn.logsumexp(jnp.where(where, x, -jnp.inf), axis=-1, keepdims=True)
        return jnp.where(where, x - jnp.where(jnp.isfinite(lse), lse, 0.0), -jnp.inf)

    report = check_vjp(lambda x: jax.nn.log_softmax(x, where=where), reference, x)
    fd = report["args"][0]["finite-difference"]
    assert fd["passed"] and fd["max_abs_error"] < 1e-5


def test_finite_differences_are_skipped_without_x64():
    with jax.enable_x64(False):
        x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 5)), jnp.float32)
        report = check_vjp(
            lambda x: jsm.logsumexp(x, axis=-1), lambda x: jax.nn.logsumexp(x, axis=-1), x
        )
    assert "finite-difference" not in report["args"][0]
