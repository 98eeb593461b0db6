"""linear_cross_entropy: the chunked linear head against the materialized logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax as jsm
from jsoftmax import _linear
from jsoftmax._linear import default_chunk_size, linear_cross_entropy
from jsoftmax.testing import check_vjp

REPO = Path(__file__).resolve().parents[1]
N, D, V = 11, 6, 13
REDUCTIONS = ["mean", "sum", "none"]
OPTIONS = {
    "plain": {},
    "bias_and_ignore_index": {"bias": True, "ignore_index": -100},
    "label_smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.03},
    "softcap": {"softcap": 1.5},
    "all": {
        "bias": True,
        "ignore_index": 4,
        "label_smoothing": 0.1,
        "z_loss": 0.01,
        "softcap": 2.0,
    },
}
# "sum" and "mean" share one code path (gradients formed in the forward pass), "none" the
# other (recomputed in the backward): every option runs through both, "sum" through the ends.
EQUALITY_CASES = [(o, r) for o in OPTIONS for r in ("mean", "none")] + [
    ("plain", "sum"),
    ("all", "sum"),
]


def _inputs(n=N, d=D, v=V, dtype=jnp.float32, seed=0, batch=None):
    rng = np.random.default_rng(seed)
    shape = (n,) if batch is None else batch
    x = jnp.asarray(rng.normal(size=(*shape, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d) * 3, dtype)
    b = jnp.asarray(rng.normal(size=(v,)), dtype)
    y = rng.integers(0, v, shape)
    y.flat[1] = -100  # an ignored example wherever ignore_index=-100
    y.flat[3] = 4
    return x, w, b, jnp.asarray(y)


def _materialized(
    x, w, labels, *, bias=None, softcap=None, loss=jsm.fused_cross_entropy, reduction="mean", **kw
):
    """The definition: form all logits, then the loss (fused VJP or plain autodiff)."""
    z = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + bias.astype(jnp.float32).reshape((1,) * (z.ndim - 1) + (-1,))
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return loss(z.astype(x.dtype), labels, reduction=reduction, **kw)


def _split(options, b, y):
    """(bias or None, keyword options, labels with -100 kept only where it is ignore_index)."""
    kw = dict(options)
    bias = b if kw.pop("bias", False) else None
    if kw.get("ignore_index") != -100:
        y = jnp.where(y < 0, 0, y)
    return bias, kw, y


def _vjp_calls(calls, seed=1):
    """``[(f(*args), VJP of f wrt every argument)]`` for each ``(f, args)`` of ``calls``, each for
    a random cotangent of its output (the same for every call of one output shape), all in one
    jitted program: compiling the compared functions together costs less than one at a time."""
    cts = []
    for f, args in calls:
        out = jax.eval_shape(f, *args)
        cts.append(jnp.asarray(np.random.default_rng(seed).normal(size=out.shape), out.dtype))
    fns = [f for f, _ in calls]

    @jax.jit
    def run(all_args, cts):
        results = []
        for f, args, ct in zip(fns, all_args, cts, strict=True):
            value, vjp = jax.vjp(f, *args)
            results.append((value, vjp(ct)))
        return results

    return run([args for _, args in calls], cts)


def _vjps(fs, *args, seed=1):
    """``_vjp_all`` of each function of ``fs`` on the same arguments, in one jitted program."""
    return _vjp_calls([(f, args) for f in fs], seed=seed)


def _vjp_all(f, *args, seed=1):
    """``f(*args)`` and its VJP with respect to every argument for a random cotangent (jitted)."""
    return _vjp_calls([(f, args)], seed=seed)[0]


def _vjp_all_fn(f, *args, seed=1):
    """``_vjp_all(f, *args)`` as a jitted function of the arguments, to run on other inputs of
    the same shapes with the same compiled program and cotangent."""
    out = jax.eval_shape(f, *args)
    ct = jnp.asarray(np.random.default_rng(seed).normal(size=out.shape), out.dtype)

    @jax.jit
    def run(*args):
        value, vjp = jax.vjp(f, *args)
        return value, vjp(ct)

    return run


def _assert_close(got, want, rtol=2e-5, atol=2e-6):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g = np.asarray(g, np.float64)
        e = np.asarray(e, np.float64)
        scale = max(1.0, float(np.nanmax(np.abs(e)))) if e.size else 1.0
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol * scale)


# ------------------------------------------------------------------------------- equality


@pytest.mark.parametrize(("option", "reduction"), EQUALITY_CASES)
def test_value_and_grads_match_fused_and_autodiff_of_the_materialized_logits(option, reduction):
    x, w, b, y = _inputs()
    bias, kw, y = _split(OPTIONS[option], b, y)
    use_bias = bias is not None

    def chunked(x, w, b):
        return linear_cross_entropy(
            x, w, y, bias=b if use_bias else None, chunk_size=4, reduction=reduction, **kw
        )

    # Against the fused VJP and against plain autodiff of the reference cross_entropy.
    losses = (jsm.fused_cross_entropy, jsm.cross_entropy)
    got, *wants = _vjps(
        [chunked]
        + [
            lambda x, w, b, loss=loss: _materialized(
                x, w, y, bias=b if use_bias else None, loss=loss, reduction=reduction, **kw
            )
            for loss in losses
        ],
        x,
        w,
        b,
    )
    for want in wants:
        _assert_close(got, want)
    if not use_bias:
        np.testing.assert_array_equal(got[1][2], 0.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_plain_loss_matches_optax_on_the_logits(reduction):
    x, w, b, y = _inputs()
    y = jnp.where(y < 0, 0, y)

    def naive(x, w, b):
        rows = optax.softmax_cross_entropy_with_integer_labels(x @ w + b[None, :], y)
        return {"mean": jnp.mean, "sum": jnp.sum, "none": lambda r: r}[reduction](rows)

    got, want = _vjps(
        [
            lambda x, w, b: linear_cross_entropy(
                x, w, y, bias=b, chunk_size=5, reduction=reduction
            ),
            naive,
        ],
        x,
        w,
        b,
    )
    _assert_close(got, want)


@pytest.mark.parametrize("chunk_size", [1, 4, N + 5, None])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_sizes_that_do_not_divide_n_give_the_same_result(chunk_size, reduction):
    x, w, b, y = _inputs()

    def chunked(x, w, b):
        return linear_cross_entropy(
            x, w, y, bias=b, chunk_size=chunk_size, ignore_index=-100, reduction=reduction
        )

    def full(x, w, b):
        return _materialized(x, w, y, bias=b, ignore_index=-100, reduction=reduction)

    _assert_close(*_vjps([chunked, full], x, w, b))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_dimensions_are_flattened_and_restored(reduction):
    x, w, b, y = _inputs(batch=(2, 3, 5))

    def chunked(x, w, b):
        return linear_cross_entropy(
            x, w, y, bias=b, chunk_size=4, ignore_index=-100, reduction=reduction
        )

    got, want = _vjps(
        [
            chunked,
            lambda x, w, b: _materialized(x, w, y, bias=b, ignore_index=-100, reduction=reduction),
        ],
        x,
        w,
        b,
    )
    assert got[0].shape == ((2, 3, 5) if reduction == "none" else ())
    assert got[1][0].shape == x.shape
    _assert_close(got, want)


@pytest.mark.parametrize(
    ("dtype", "reduction"), [(jnp.bfloat16, "mean"), (jnp.bfloat16, "none"), (jnp.float16, "mean")]
)
def test_16bit_inputs_give_float32_loss_and_grads_in_their_dtype(dtype, reduction):
    x, w, b, y = _inputs(dtype=dtype, seed=3)
    kw = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0}

    def chunked(x, w, b):
        return linear_cross_entropy(x, w, y, bias=b, chunk_size=4, reduction=reduction, **kw)

    # The reference sees the same 16-bit inputs but keeps the logits in float32: the only
    # differences left are the 16-bit roundings of the logits' gradient.
    f32 = tuple(a.astype(jnp.float32) for a in (x, w, b))
    (value, grads), want = _vjp_calls(
        [
            (chunked, (x, w, b)),
            (lambda x, w, b: _materialized(x, w, y, bias=b, reduction=reduction, **kw), f32),
        ]
    )
    assert value.dtype == jnp.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    _assert_close((value, grads), want, rtol=3e-2, atol=1.6e-2)


# ------------------------------------------------------------------------------- softcap


def test_softcap_gradient_agrees_with_jacrev_jacfwd_and_finite_differences(x64):
    x, w, b, y = _inputs(n=4, d=2, v=5, dtype=jnp.float64)

    @jax.jit
    def chunked(x, w, b):
        return linear_cross_entropy(
            x, w, y, bias=b, chunk_size=2, softcap=0.7, ignore_index=-100, reduction="none"
        )

    def reference(x, w, b):
        z = 0.7 * jnp.tanh((x @ w + b[None, :]) / 0.7)
        return jsm.cross_entropy(z, y, ignore_index=-100, reduction="none")

    report = check_vjp(chunked, jax.jit(reference), x, w, b, argnums=(0, 1, 2))
    assert set(report["args"]) == {0, 1, 2}


def test_softcap_test_catches_a_missing_tanh_derivative(monkeypatch):
    x, w, b, y = _inputs()
    kw = {"softcap": 1.5, "ignore_index": -100}

    def chunked(x, w, b):
        return linear_cross_entropy(x, w, y, bias=b, chunk_size=4, **kw)

    got, want = _vjps([chunked, lambda x, w, b: _materialized(x, w, y, bias=b, **kw)], x, w, b)
    _assert_close(got, want)
    # Plant the classic bug, chaining dz straight through the cap without 1 - tanh²: the same
    # comparison must fail, on every one of x, w and bias.
    monkeypatch.setattr(_linear, "_pre_cap_grad", lambda dz, v: dz)
    wrong = _vjp_all(chunked, x, w, b)
    np.testing.assert_allclose(wrong[0], want[0], rtol=1e-6)  # the value is unaffected
    for g, e in zip(wrong[1], want[1], strict=True):
        with pytest.raises(AssertionError):
            _assert_close(g, e)


# ------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vmap_agrees_with_a_loop_over_sequences(reduction):
    x, w, b, y = _inputs(batch=(3, 5))

    def per_sequence(x, y, w, b):
        return linear_cross_entropy(
            x, w, y, bias=b, chunk_size=2, ignore_index=-100, reduction=reduction
        )

    def batched(x, w, b):
        return jax.vmap(per_sequence, in_axes=(0, 0, None, None))(x, y, w, b)

    def looped(x, w, b):
        return jnp.stack([per_sequence(x[i], y[i], w, b) for i in range(3)])

    _assert_close(*_vjps([batched, looped], x, w, b))


def test_eager_and_jit_give_the_same_value_and_grads():
    x, w, b, y = _inputs()

    def f(x, w, b):
        return linear_cross_entropy(
            x, w, y, bias=b, chunk_size=4, ignore_index=-100, softcap=2.0, label_smoothing=0.1
        )

    eager = jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, b)
    jitted = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, b)
    _assert_close(eager, jitted, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_penalty_differentiates_through_the_backward_pass(reduction):
    x, w, b, y = _inputs(n=6, d=4, v=5)
    y = jnp.where(y < 0, 0, y)

    def penalty(loss):
        # A gradient penalty: differentiates through the backward pass.
        return lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(loss(x)))(x) ** 2)

    def chunked(x):
        return linear_cross_entropy(x, w, y, chunk_size=4, softcap=2.0, reduction=reduction)

    def reference(x):
        return _materialized(x, w, y, softcap=2.0, loss=jsm.cross_entropy, reduction=reduction)

    # Both in one jitted program.
    _assert_close(
        *jax.jit(lambda x: (jax.grad(penalty(chunked))(x), jax.grad(penalty(reference))(x)))(x)
    )


def test_sum_cotangent_scales_the_gradients_computed_in_the_forward_pass():
    x, w, b, y = _inputs()

    def f(x, w, b):
        return linear_cross_entropy(x, w, y, bias=b, ignore_index=-100, chunk_size=3)

    _, vjp = jax.vjp(f, x, w, b)
    ones, scaled = vjp(jnp.float32(1.0)), vjp(jnp.float32(-2.5))
    for g1, g2 in zip(ones, scaled, strict=True):
        np.testing.assert_allclose(g2, -2.5 * g1, rtol=1e-6)


# ------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bad_label_gives_nan_in_its_row_only(reduction):
    x, w, b, y = _inputs()
    y = y.at[5].set(V)  # out of range and not ignore_index

    def f(x, w, b):
        return linear_cross_entropy(
            x, w, y, bias=b, ignore_index=-100, chunk_size=4, reduction=reduction
        )

    keep = np.arange(N) != 5

    def without_row_5(x, w, b):
        return linear_cross_entropy(
            x[keep], w, y[keep], bias=b, ignore_index=-100, chunk_size=4, reduction="none"
        )

    # For "none", the call without row 5 is compiled in the same program.
    fs = [f, without_row_5] if reduction == "none" else [f]
    (value, (dx, dw, db)), *good = _vjps(fs, x, w, b)
    if reduction == "none":
        assert np.isnan(value[5]) and np.all(np.isfinite(np.delete(np.asarray(value), 5)))
    else:
        assert np.isnan(value)
    assert np.all(np.isnan(dx[5]))
    assert np.all(np.isfinite(np.delete(np.asarray(dx), 5, axis=0)))
    # dw and dbias sum over rows, as the materialized path's x.T @ dlogits does.
    assert np.all(np.isnan(dw)) and np.all(np.isnan(db))
    if reduction == "none":
        np.testing.assert_allclose(np.asarray(value)[keep], good[0][0], rtol=1e-6)


def test_nan_in_one_example_never_changes_another():
    x, w, b, y = _inputs()
    x_nan = x.at[2, 0].set(jnp.nan)
    kw = {"bias": b, "ignore_index": -100, "chunk_size": 4, "reduction": "none"}
    # One compiled program, run on the clean and on the poisoned input.
    run = _vjp_all_fn(lambda x, w, b: linear_cross_entropy(x, w, y, **kw), x, w, b)
    clean, dirty = run(x, w, b), run(x_nan, w, b)
    keep = np.arange(N) != 2
    np.testing.assert_array_equal(np.asarray(dirty[0])[keep], np.asarray(clean[0])[keep])
    np.testing.assert_array_equal(np.asarray(dirty[1][0])[keep], np.asarray(clean[1][0])[keep])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignored_examples_have_zero_loss_zero_grad_and_leave_the_mean(reduction):
    x, w, b, y = _inputs()
    y = y.at[7].set(-100)
    ignored = np.asarray(y) == -100

    def f(x, w, b):
        return linear_cross_entropy(
            x, w, y, bias=b, ignore_index=-100, chunk_size=4, reduction=reduction
        )

    def rows_fn(x, w, b):
        return linear_cross_entropy(x, w, y, bias=b, ignore_index=-100, reduction="none")

    (value, (dx, _, _)), (rows, _) = _vjps([f, rows_fn], x, w, b)
    np.testing.assert_array_equal(dx[ignored], 0.0)
    np.testing.assert_array_equal(rows[ignored], 0.0)
    if reduction == "mean":
        np.testing.assert_allclose(value, np.sum(rows) / np.sum(~ignored), rtol=1e-6)


def test_mean_over_only_ignored_examples_is_zero_with_zero_grad():
    x, w, b, _ = _inputs()
    y = jnp.full((N,), -1)
    value, grads = jax.jit(
        jax.value_and_grad(
            lambda x, w, b: linear_cross_entropy(x, w, y, bias=b, ignore_index=-1),
            argnums=(0, 1, 2),
        )
    )(x, w, b)
    assert value == 0.0
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_neg_inf_bias_on_padded_vocabulary_matches_fused():
    x, w, b, y = _inputs()
    y = jnp.where(y < 0, 0, y) % (V - 3)
    b = b.at[V - 3 :].set(-jnp.inf)  # three padding entries that must get probability 0
    kw = {"label_smoothing": 0.1, "z_loss": 0.01, "reduction": "none"}
    got, want = _vjps(
        [
            lambda x, w, b: linear_cross_entropy(x, w, y, bias=b, chunk_size=4, **kw),
            lambda x, w, b: _materialized(x, w, y, bias=b, **kw),
        ],
        x,
        w,
        b,
    )
    assert np.all(np.isfinite(got[0]))
    _assert_close(got, want)


def test_confident_row_keeps_its_relative_accuracy():
    # Logits [40, 0, 0, 0]: loss = log1p(3 e^-40) ≈ 1.3e-17, which 1 + 3e^-40 rounds to 0.
    x = jnp.array([[1.0]])
    w = jnp.array([[40.0, 0.0, 0.0, 0.0]])
    y = jnp.array([0])
    loss, dw = jax.value_and_grad(lambda w: linear_cross_entropy(x, w, y), argnums=0)(w)
    exact = 3 * np.exp(-40.0)
    np.testing.assert_allclose(loss, exact, rtol=1e-6)
    np.testing.assert_allclose(dw[0, 0], -exact / (1 + exact), rtol=1e-6)
    naive = optax.softmax_cross_entropy_with_integer_labels(x @ w, y)[0]
    assert naive == 0.0  # what the textbook formula returns


# ------------------------------------------------------------------------------- unaligned V


def _naive_head(x, w, b, y, reduction):
    rows = optax.softmax_cross_entropy_with_integer_labels(
        jnp.dot(x, w, preferred_element_type=jnp.float32) + b[None, :], y
    )
    return {"mean": jnp.mean, "sum": jnp.sum, "none": lambda r: r}[reduction](rows)


@pytest.mark.parametrize(
    ("vocab", "n", "reduction"),
    [
        (2049, 20, "mean"),  # one-pass: 8-row chunks, the last moved back; 512-column walks
        (2049, 20, "none"),  # two-pass: a single tile of 2049 columns
        (50257, 20, "mean"),
        (50257, 20, "none"),  # tiles of 2048, the last one moved back to end at 50257
        (151936, 20, "mean"),
        (151936, 64, "sum"),  # 64 x 151936 logits exceed the one-pass block: two passes
    ],
)
def test_unaligned_vocabularies_match_the_naive_head(vocab, n, reduction):
    d = 4
    rng = np.random.default_rng(vocab)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(vocab,)), jnp.float32)
    y = rng.integers(0, vocab, n)
    # Labels at both ends, at tile edges, and in the columns the moved-back last tile repeats.
    y[:6] = [0, vocab - 1, 2047, 2048, vocab - 2048 + 1, vocab - 600]
    y = jnp.asarray(y % vocab, jnp.int32)
    chunk = 8 if n == 20 else None
    plan = _linear._plan(n, d, vocab, chunk, reduction != "none")
    assert plan.one_pass == (reduction == "mean")

    def ours(x, w, b):
        return linear_cross_entropy(x, w, y, bias=b, chunk_size=chunk, reduction=reduction)

    got, want = _vjps([ours, lambda x, w, b: _naive_head(x, w, b, y, reduction)], x, w, b)
    _assert_close(got, want, rtol=3e-5, atol=3e-6)


def test_rows_far_below_zero_stay_finite():
    # Regression: every logit below -88 (e^z underflows), the first tile merged into the empty
    # running sum as 0 * e^(0 - m) = 0 * inf = NaN.
    x = jnp.ones((2, 1))
    w = jnp.array([[-100.0, -118.0, -130.0, -130.0]])
    y = jnp.array([0, 2])
    for reduction in ("none", "sum"):
        loss, dw = jax.value_and_grad(
            lambda w, r=reduction: jnp.sum(linear_cross_entropy(x, w, y, reduction=r))
        )(w)
        assert np.isfinite(loss) and np.all(np.isfinite(dw)), reduction
        want = _materialized(x, w, y, reduction="sum")
        np.testing.assert_allclose(loss, want, rtol=1e-6)


# ------------------------------------------------------------------------------- memory


def _temp_mib(f, n, d, v):
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_temp_memory_does_not_scale_with_tokens_like_the_naive_path():
    d, v = 64, 4096

    def naive(x, w, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, y))

    def chunked(x, w, y):
        return linear_cross_entropy(x, w, y, chunk_size=128)

    small, large = 1024, 8192
    naive_small, naive_large = _temp_mib(naive, small, d, v), _temp_mib(naive, large, d, v)
    ours_small, ours_large = _temp_mib(chunked, small, d, v), _temp_mib(chunked, large, d, v)
    # The naive path holds [N, V] logits (16 MiB per 1024 rows here); ours holds one chunk.
    assert naive_large > 6 * naive_small
    assert ours_large <= 1.25 * ours_small
    assert ours_large < naive_large / 16


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_second_vocabulary_sized_array_beside_the_gradients(reduction, bias):
    # dw ([D, V], 8 MiB here) is accumulated in its own buffer, tile by tile: the temporaries are
    # one [R, V] block of logits (8 MiB, one-pass) or [R, tile] tiles (two-pass) and small ones.
    n, d, v = 2048, 256, 8192

    def ours(x, w, y):
        # A bias (zeros of w's last row: a traced [V] array) must not add a second block.
        b = w[-1] * 0 if bias else None
        return jnp.sum(linear_cross_entropy(x, w, y, bias=b, reduction=reduction))

    plan = _linear._plan(n, d, v, None, reduction != "none")
    block = plan.rows * v * 4 / 2**20 if plan.one_pass else 0.0
    assert _temp_mib(ours, n, d, v) < block + 4.0  # a second [D, V] array would be 8 MiB


def test_temp_memory_does_not_grow_with_the_vocabulary_past_the_block():
    # Past 65536 classes a 128-row block of whole rows would exceed 32 MiB: the vocabulary is
    # tiled, and the temporaries stop growing with V.
    def ours(x, w, y):
        return linear_cross_entropy(x, w, y)

    sizes = [_temp_mib(ours, 512, 64, v) for v in (1 << 17, 1 << 18, 1 << 19)]
    assert max(sizes) < 4.0 and max(sizes) <= 1.05 * min(sizes), sizes


def test_default_chunk_size_bounds_the_logit_block():
    # Whole rows fit: 128 rows at D=512 (a 16 MiB block), 256 at D=256 (x_c of 2**16 entries).
    assert default_chunk_size(8192, 32768, 512) == 128
    assert default_chunk_size(2048, 32768, 256) == 256
    assert default_chunk_size(2048, 50257, 256) == 128  # 256 rows would exceed the block
    assert default_chunk_size(8192, 4096, 64) == 256  # at most 256
    for n, v, d in ((8192, 32768, 512), (2048, 32768, 256), (8192, 16384, 128)):
        assert default_chunk_size(n, v, d) * v <= _linear._ONE_PASS_ELEMENTS
    assert default_chunk_size(100_000, 2**20, 64) == 256  # rows too wide: tiles of 256 rows
    assert default_chunk_size(10, 32768, 512) == 10
    n = 1100
    c = default_chunk_size(n, 32768, 512)
    assert c % 8 == 0 and -(-n // c) * c - n < 8 * -(-n // c)  # balanced: little overlap


@pytest.mark.parametrize(
    ("shape", "reduction", "one_pass", "rows", "tile", "stats_tile"),
    [
        ((8192, 512, 32768), "mean", True, 128, 512, 2048),  # [D, tile] temporaries of 1 MiB
        ((2048, 256, 32768), "sum", True, 256, 1024, 1024),  # [R, T] <= 2**18 too
        ((1024, 512, 50257), "mean", True, 128, 512, 2048),  # 99 tiles, the last one moved
        ((4096, 256, 262144), "mean", False, 256, 1024, 1024),  # a 128-row block: 128 MiB
        ((8192, 512, 32768), "none", False, 128, 512, 512),  # per-row cotangents: two passes
        ((64, 4096, 4096), "mean", True, 64, 128, 2048),  # wide rows: tiles no narrower than 128
        ((11, 6, 13), "mean", True, 11, 13, 13),
    ],
)
def test_plan_picks_the_schedule_by_the_stated_rule(
    shape, reduction, one_pass, rows, tile, stats_tile
):
    n, d, v = shape
    plan = _linear._plan(n, d, v, None, reduction != "none")
    assert (plan.one_pass, plan.rows, plan.tile) == (one_pass, rows, tile)
    assert plan.stats_tile == stats_tile


# ------------------------------------------------------------------------------- platforms


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_exports_for_accelerators_without_cpu_tricks(platform, reduction):
    """The programs exported for GPU and TPU (value and value_and_grad, both schedules) lower
    cleanly and carry no ``optimization_barrier``: the head is one plain formulation."""
    args = (
        jax.ShapeDtypeStruct((40, 8), jnp.float32),
        jax.ShapeDtypeStruct((8, 5000), jnp.float32),
        jax.ShapeDtypeStruct((40,), jnp.int32),
    )

    def f(x, w, y):
        return jnp.sum(linear_cross_entropy(x, w, y, chunk_size=16, reduction=reduction))

    for fn in (f, jax.value_and_grad(f, argnums=(0, 1))):
        text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
        assert "optimization_barrier" not in text
        assert "stablehlo.while" in text  # the chunk and tile loops


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_portable_branch_gives_the_same_values_and_grads(reduction):
    from jsoftmax import _platform

    x, w, b, y = _inputs()
    kw = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 0.01, "softcap": 2.0}

    def f(x, w, b):
        return linear_cross_entropy(x, w, y, bias=b, chunk_size=4, reduction=reduction, **kw)

    default = _vjp_all(f, x, w, b)
    with _platform.force_portable():
        portable = _vjp_all(f, x, w, b)
        want = _vjp_all(
            lambda x, w, b: _materialized(x, w, y, bias=b, reduction=reduction, **kw), x, w, b
        )
    _assert_close(portable, want)
    _assert_close(portable, default, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------- sharding


def _mesh():
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.fail("conftest requests 8 host devices; found fewer than 4")
    return Mesh(np.array(devices[:4]).reshape(2, 2), ("batch", "vocab"))


@pytest.mark.parametrize(
    ("option", "reduction", "check_vma"),
    [
        ("plain", "sum", True),
        ("all", "none", True),
        ("all", "sum", False),
        ("plain", "none", False),
    ],
)
def test_vocab_parallel_shard_map_matches_the_unsharded_call(option, reduction, check_vma):
    mesh = _mesh()
    x, w, b, y = _inputs(n=12, d=D, v=16)
    bias, kw, y = _split(OPTIONS[option], b, y)
    use_bias = bias is not None
    specs = {"x": P("batch", None), "w": P(None, "vocab"), "b": P("vocab"), "y": P("batch")}

    def local(x, w, b, y):
        out = linear_cross_entropy(
            x,
            w,
            y,
            bias=b if use_bias else None,
            chunk_size=4,
            reduction=reduction,
            axis_name="vocab",
            **kw,
        )
        return out[None] if reduction == "sum" else out  # one partial sum per batch shard

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=tuple(specs.values()), out_specs=P("batch"), check_vma=check_vma
    )

    def f_sharded(x, w, b):
        out = sharded(x, w, b, y)
        return jnp.sum(out) if reduction == "sum" else out

    def f_plain(x, w, b):
        return linear_cross_entropy(
            x, w, y, bias=b if use_bias else None, chunk_size=4, reduction=reduction, **kw
        )

    placed = [
        jax.device_put(a, NamedSharding(mesh, specs[k])) for k, a in (("x", x), ("w", w), ("b", b))
    ]
    _assert_close(_vjp_all(f_sharded, *placed), _vjp_all(f_plain, x, w, b))


def test_unbound_axis_name_raises_naming_it():
    x, w, _, y = _inputs()
    with pytest.raises(ValueError, match=r"^axis_name: 'vocab'"):
        linear_cross_entropy(x, w, jnp.where(y < 0, 0, y), axis_name="vocab")


# ------------------------------------------------------------------------------- validation


def _bad_calls():
    x, w, b, y = _inputs()
    return [
        ("x", TypeError, dict(x=jnp.ones((N, D), jnp.int32))),
        ("w", ValueError, dict(w=jnp.ones((D + 1, V)))),
        ("w", ValueError, dict(w=jnp.ones((D,)))),
        ("w", TypeError, dict(w=jnp.ones((D, V), jnp.int32))),
        ("bias", ValueError, dict(bias=jnp.ones((V + 1,)))),
        ("labels", TypeError, dict(labels=y.astype(jnp.float32))),
        ("labels", ValueError, dict(labels=y[:-1])),
        ("chunk_size", ValueError, dict(chunk_size=0)),
        ("chunk_size", TypeError, dict(chunk_size=2.5)),
        ("softcap", ValueError, dict(softcap=0.0)),
        ("softcap", ValueError, dict(softcap=-1.0)),
        ("label_smoothing", ValueError, dict(label_smoothing=1.0)),
        ("label_smoothing", ValueError, dict(label_smoothing=-0.1)),
        ("z_loss", ValueError, dict(z_loss=-1e-4)),
        ("reduction", ValueError, dict(reduction="avg")),
        ("ignore_index", TypeError, dict(ignore_index=1.5)),
    ], (x, w, b, y)


@pytest.mark.parametrize("case", range(len(_bad_calls()[0])))
def test_invalid_arguments_raise_naming_the_argument(case):
    calls, (x, w, _, y) = _bad_calls()
    name, error, override = calls[case]
    args = {"x": x, "w": w, "labels": y, **override}
    with pytest.raises(error, match=rf"^{name}: "):
        linear_cross_entropy(args.pop("x"), args.pop("w"), args.pop("labels"), **args)


# ------------------------------------------------------------------------------- experiment


def test_train_lm_quick_mode_runs_and_learns(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "train_lm.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    result = json.loads((tmp_path / "train_lm.json").read_text())
    losses = result["loss_curve"]["train_loss"]
    assert losses[-1] < losses[0]
    assert (tmp_path / "train_lm.png").exists()
