"""The fused loss on rows wide enough to be summed in blocks (256 classes and more).

With integer labels, the fused forward sums ``exp(z - m)`` in blocks of 128 classes and sums the
label's block again without the label (``jsoftmax._numerics._sum_without_label``). These rows put
the label in every kind of place: the first and the last block, the ragged tail after the last
full block, at the row max with a remainder down to 1e-26, tied with maxima in other blocks,
next to excluded classes and ``-inf`` logits. Everything is checked against the float64 oracle
and against the autodiff reference, eagerly, under ``jit``, under ``vmap`` and with the class
axis split over devices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax as jsm
from jsoftmax import _numerics
from tests import oracle

BLOCK = _numerics._BLOCK
# Widths: just under two blocks (one plain sum), exactly two, blocks plus a ragged tail, many,
# and wider than 128 blocks of 128 (128 wider blocks), without and with a tail.
WIDTHS = [2 * BLOCK - 1, 2 * BLOCK, 3 * BLOCK + 5, 1000, BLOCK**2 + 3 * BLOCK, 20000]
LOSS_RTOL = 4e-6  # 64 float32 ulps
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-30


@functools.cache
def wide_case(width: int):
    """Logits ``[R, width]``, integer labels, a class mask, and what each row is for."""
    rng = np.random.default_rng(width)
    rows, labels, why = [], [], []

    def add(row, label, what):
        rows.append(np.asarray(row, np.float32))
        labels.append(label)
        why.append(what)

    last_block = (width // BLOCK - 1) * BLOCK
    places = {"first": 3, "block edge": BLOCK - 1, "last block": last_block + 7, "last": width - 1}
    for where, label in places.items():
        add(rng.normal(size=width) * 3, label, f"random, label {where}")
        confident = rng.uniform(-70, -60, width)
        confident[label] = 0.0
        add(confident, label, f"label at the max, remainder ~1e-26, label {where}")
        tied = rng.normal(size=width) - 30
        tied[label] = 5.0
        tied[(label + BLOCK + 1) % width] = 5.0  # a tie in another block
        add(tied, label, f"label tied at the max with another block, label {where}")
        below = rng.normal(size=width) - 30
        below[label] = 4.0
        below[(label + 2 * BLOCK + 3) % width] = 5.0
        add(below, label, f"label one below the max, label {where}")
    neg = rng.normal(size=width)
    neg[::7] = -np.inf
    add(neg, 14, "-inf logits around the label")
    add(rng.normal(size=width) + 1e4, width // 2, "logits near 1e4")
    z = np.stack(rows)
    mask = np.ones(z.shape, bool)
    mask[:, 1::5] = False  # excluded classes in every block, never a label above
    y = np.asarray(labels, np.int32)
    mask[np.arange(len(y)), y] = True
    return z, y, mask, why


def loss_and_grad(z, y, mask):
    """Per-row losses and the gradient of their sum (``mask`` None: no ``where``)."""

    def total(z):
        return jnp.sum(jsm.fused_cross_entropy(z, y, where=mask))

    return jsm.fused_cross_entropy(z, y, where=mask), jax.grad(total)(z)


def one_row_at_a_time(f):
    """``f`` under ``vmap`` over the rows, each row a batch of one."""

    def row(z, y, mask):
        batch = None if mask is None else mask[None]
        return tuple(out[0] for out in f(z[None], y[None], batch))

    return lambda z, y, mask: jax.vmap(row, in_axes=(0, 0, None if mask is None else 0))(z, y, mask)


TRANSFORMS = {"eager": lambda f: f, "jit": jax.jit, "vmap": one_row_at_a_time}


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("width", WIDTHS)
def test_fused_loss_and_gradient_on_wide_rows_match_float64(width, transform, masked):
    z, y, mask, why = wide_case(width)
    loss, grad = TRANSFORMS[transform](loss_and_grad)(
        jnp.asarray(z), jnp.asarray(y), jnp.asarray(mask) if masked else None
    )
    want_loss, want_grad, _ = oracle.cross_entropy(z, y, where=mask if masked else None)
    # The label's component a_y - 1 = -sum of the others: the oracle's float64 a_y - 1 is 0 for
    # the confident rows (a_y rounds to 1 in float64 too).
    rows = np.arange(len(y))
    want_grad[rows, y] = 0.0
    want_grad[rows, y] = -want_grad.sum(-1)
    for i, what in enumerate(why):
        np.testing.assert_allclose(loss[i], want_loss[i], rtol=LOSS_RTOL, err_msg=what)
        # Every component to 1e-5 relative, the 1e-27 ones of a confident row included.
        np.testing.assert_allclose(
            grad[i], want_grad[i], rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=what
        )


@pytest.mark.parametrize("width", WIDTHS)
def test_fused_matches_reference_on_wide_rows_with_every_option(width):
    """Smoothing, z-loss, ignore_index and a bad label, against the autodiff reference."""
    z, y, mask, why = wide_case(width)
    y = y.copy()
    y[0], y[1] = -100, width + 2  # ignored, out of range
    kw = dict(where=jnp.asarray(mask), label_smoothing=0.1, z_loss=1e-4, ignore_index=-100)

    @jax.jit
    def both(z, y):
        return [
            # Each lambda is differentiated within its own iteration.
            jax.value_and_grad(
                lambda z: jnp.sum(fn(z, y, **kw) * jnp.arange(1.0, len(why) + 1))  # noqa: B023
            )(z)
            for fn in (jsm.fused_cross_entropy, jsm.cross_entropy)
        ] + [jsm.fused_cross_entropy(z, y, **kw), jsm.cross_entropy(z, y, **kw)]

    (vf, gf), (vr, gr), lf, lr = both(jnp.asarray(z), jnp.asarray(y))
    assert lf[0] == 0 and np.isnan(lf[1]) and np.isnan(lr[1])
    np.testing.assert_allclose(lf[2:], lr[2:], rtol=LOSS_RTOL)
    np.testing.assert_allclose(gf[2:], gr[2:], rtol=1e-5, atol=1e-6)
    assert np.all(gf[0] == 0) and np.all(np.isnan(gf[1][mask[1]]))


@pytest.mark.parametrize("shared_exp", [False, True])
@pytest.mark.parametrize("width", [3 * BLOCK + 5, 4 * BLOCK])
def test_label_sum_leaves_out_the_label_only(width, shared_exp):
    """The block sum itself: every entry but the label's, ties included, in float64 exactly;
    also spelled as the fused loss's forward rule spells it (``shared_exp``)."""
    z = np.full((width,), -3.0, np.float32)
    z[[0, BLOCK, width - 1]] = 0.0  # three maxima: first block, second block, last entry
    z = np.tile(z, (width, 1))
    labels = np.arange(width)[:, None]
    sum_without = functools.partial(_numerics._sum_without_label, shared_exp=shared_exp)
    q = jax.jit(sum_without)(jnp.asarray(z), jnp.zeros((width, 1)), labels)
    want = np.exp(np.float64(z)).sum(-1) - np.exp(np.float64(z[0]))
    np.testing.assert_allclose(np.asarray(q)[:, 0], want, rtol=1e-6)
    # A label outside this shard's classes leaves nothing out.
    for outside in (-1, width, -BLOCK - 1, 10 * width):
        q = sum_without(jnp.asarray(z[:1]), jnp.zeros((1, 1)), jnp.array([[outside]]))
        np.testing.assert_allclose(q[0, 0], np.exp(np.float64(z[0])).sum(), rtol=1e-6)


def test_block_sum_minus_one_keeps_every_digit_and_counts_ties():
    """``_minus_one``: ``sum exp(z - m) - 1`` over one block, as ``R + (t - 1)``."""
    tiny = np.full(BLOCK, -70.0, np.float32)
    cases = {
        "one max, remainder ~1e-28": (tiny, [0]),
        "two max entries": (tiny, [3, 90]),
        "three max entries": (tiny, [0, 1, BLOCK - 1]),
        "no max entry in the block": (np.full(BLOCK, -0.5, np.float32), []),
        "max entry next to -inf": (np.where(np.arange(BLOCK) % 2, -np.inf, -5.0), [4]),
    }
    minus_one = jax.jit(_numerics._minus_one)
    for what, (row, at_max) in cases.items():  # the row max m is 0 throughout
        z = np.array(row, np.float32)
        z[at_max] = 0.0
        got = float(minus_one(jnp.asarray(z)[None], jnp.zeros((1, 1)))[0, 0])
        d = np.float64(z)
        want = float(np.exp(d[d < 0]).sum() + (np.sum(d == 0) - 1))  # no 1 + tiny rounded
        assert math.isclose(got, want, rel_tol=4e-6), (what, got, want)
    # A NaN or +inf entry makes the row NaN, wherever it is.
    for bad, m in ((np.nan, 0.0), (np.inf, np.inf)):
        z = tiny.copy()
        z[[0, 7]] = 0.0
        z[5] = bad
        got = _numerics._minus_one(jnp.asarray(z)[None], jnp.full((1, 1), m))
        assert np.isnan(got[0, 0]), bad


@pytest.mark.skipif(len(jax.devices("cpu")) < 4, reason="needs 4 CPU devices (see conftest.py)")
@pytest.mark.parametrize(("shards", "width"), [(2, 2 * (3 * BLOCK + 5)), (4, 4 * 2 * BLOCK)])
def test_fused_on_wide_rows_split_over_devices_matches_one_device(shards, width):
    """``axis_name`` inside ``shard_map``, each shard wide enough to be summed in blocks."""
    rng = np.random.default_rng(shards)
    rows = 12
    z = rng.normal(size=(rows, width)).astype(np.float32) * 2
    y = rng.integers(0, width, rows).astype(np.int32)
    y[:4] = [0, width // shards - 1, width // shards, width - 1]  # shard edges
    z[np.arange(rows), y] += np.where(np.arange(rows) % 2 == 0, 60.0, 0.0)  # confident rows
    mesh = jax.make_mesh((shards,), ("model",), devices=jax.devices("cpu")[:shards])

    def loss(z, y, axis_name=None):
        return jsm.fused_cross_entropy(z, y, axis_name=axis_name)

    def vg(z, y, axis_name=None):
        cot = jnp.arange(1.0, rows + 1)
        out, pullback = jax.vjp(lambda z: loss(z, y, axis_name), z)
        return out, pullback(cot)[0]

    sharded = jax.jit(
        jax.shard_map(
            functools.partial(vg, axis_name="model"),
            mesh=mesh,
            in_specs=(P(None, "model"), P()),
            out_specs=(P(), P(None, "model")),
        )
    )
    got_loss, got_grad = sharded(
        jax.device_put(z, NamedSharding(mesh, P(None, "model"))),
        jax.device_put(y, NamedSharding(mesh, P())),
    )
    want_loss, want_grad = jax.jit(vg)(jnp.asarray(z), jnp.asarray(y))
    want_oracle, _, _ = oracle.cross_entropy(z, y)
    np.testing.assert_allclose(got_loss, want_loss, rtol=LOSS_RTOL)
    np.testing.assert_allclose(got_loss, want_oracle, rtol=LOSS_RTOL)
    assert np.min(want_oracle) < 1e-20  # the confident rows are in the test
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=math.ulp(1.0))


# ----------------------------------------------------------------- normalizers and soft labels


@functools.cache
def wide_soft_case(width: int):
    """Rows for the normalizers: the rows of ``wide_case`` plus the max alone in the tail or in
    the last block, and soft targets (not summing to 1) for the losses."""
    z, _, mask, why = wide_case(width)
    rng = np.random.default_rng(width + 1)
    extra = rng.uniform(-80, -60, (4, width)).astype(np.float32)
    extra[0, -1] = 0.0  # the max alone in the last column (the tail when there is one)
    extra[1, BLOCK] = 0.0  # the max alone at the start of the second block
    # The block with the largest sum holds no max entry: the max alone in block one, a block of
    # entries just below it, or a tail of them (the last 40 columns).
    extra[2, 0], extra[2, BLOCK : 2 * BLOCK] = 5.0, 4.9
    extra[3, 0], extra[3, -40:] = 5.0, 4.95
    z = np.concatenate([z, extra])
    mask = np.concatenate([mask, np.ones_like(extra, bool)])
    targets = rng.random(z.shape).astype(np.float32)
    targets[np.isneginf(z)] = 0.0  # no weight on -inf logits
    return (
        z,
        mask,
        targets,
        why
        + [
            "max alone in the last column",
            "max alone in block two",
            "largest block sum without the max",
            "largest sum in the last columns, without the max",
        ],
    )


@pytest.mark.parametrize("transform", ["eager", "jit"])
@pytest.mark.parametrize("width", WIDTHS)
def test_normalizers_on_wide_rows_match_float64(width, transform):
    z, _, _, why = wide_soft_case(width)
    run = TRANSFORMS[transform]
    log_p = run(jsm.log_softmax)(jnp.asarray(z))
    lse = run(lambda z: jsm.logsumexp(z, axis=-1))(jnp.asarray(z))
    p = run(jsm.softmax)(jnp.asarray(z))
    want = oracle.log_softmax(z)
    for i, what in enumerate(why):
        finite = np.isfinite(want[i])
        np.testing.assert_allclose(log_p[i][finite], want[i][finite], rtol=LOSS_RTOL, err_msg=what)
        assert np.all(np.asarray(log_p[i])[~finite] == -np.inf), what
        # lse = z_j - log a_j at a max entry: oracle.logsumexp's log(sum) loses a 1e-25 remainder.
        top = np.argmax(z[i])
        np.testing.assert_allclose(
            lse[i], np.float64(z[i, top]) - want[i, top], rtol=LOSS_RTOL, err_msg=what
        )
        np.testing.assert_allclose(
            p[i], np.exp(want[i]), rtol=2 * LOSS_RTOL, atol=1e-37, err_msg=what
        )


@pytest.mark.parametrize("width", WIDTHS)
def test_normalizer_derivatives_on_wide_rows_match_float64(width):
    """The tangent of log_softmax and the gradient of logsumexp (softmax), under jit."""
    z, _, _, why = wide_soft_case(width)
    rng = np.random.default_rng(3)
    dz = rng.normal(size=z.shape).astype(np.float32)

    @jax.jit
    def derivatives(z, dz):
        _, tangent = jax.jvp(jsm.log_softmax, (z,), (dz,))
        return tangent, jax.grad(lambda z: jnp.sum(jsm.logsumexp(z, axis=-1)))(z)

    tangent, grad = derivatives(jnp.asarray(z), jnp.asarray(dz))
    p = np.exp(oracle.log_softmax(z))
    # d log a_i = dz_i - sum_j a_j dz_j (also at a -inf logit, as in jax.nn; a_j = 0 there).
    want_tangent = dz - np.sum(p * dz, -1, keepdims=True)
    for i, what in enumerate(why):
        np.testing.assert_allclose(tangent[i], want_tangent[i], rtol=1e-5, atol=1e-5, err_msg=what)
        np.testing.assert_allclose(grad[i], p[i], rtol=1e-5, atol=1e-37, err_msg=what)


@pytest.mark.parametrize("width", WIDTHS)
def test_soft_label_losses_on_wide_rows_match_float64(width):
    z, mask, targets, why = wide_soft_case(width)
    args = (jnp.asarray(z), jnp.asarray(targets))
    for fn in (jsm.cross_entropy, jsm.fused_cross_entropy):

        def total(z, y, fn=fn):
            return jnp.sum(fn(z, y, where=mask))

        loss, (gz, gy) = jax.jit(jax.value_and_grad(total, (0, 1)))(*args)
        rows = jax.jit(functools.partial(fn, where=mask))(*args)
        want, want_gz, want_gy = oracle.cross_entropy(z, targets, where=mask)
        name = fn.__name__
        for i, what in enumerate(why):
            np.testing.assert_allclose(rows[i], want[i], rtol=LOSS_RTOL, err_msg=f"{name}: {what}")
            np.testing.assert_allclose(gz[i], want_gz[i], rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(gy[i], want_gy[i], rtol=1e-5, atol=1e-6, err_msg=name)


EDGE_ROWS = {  # what each row must give, as for rows under two blocks wide
    "NaN logit": ("nan", np.nan),
    "+inf logit": ("nan", np.inf),
    "NaN among -inf": ("nan", None),
    "all -inf": ("empty", None),
}


@pytest.mark.parametrize("width", [20] + WIDTHS)
@pytest.mark.parametrize("row", list(EDGE_ROWS))
def test_edge_rows_give_the_same_answer_at_every_width(row, width):
    kind, value = EDGE_ROWS[row]
    z = np.random.default_rng(0).normal(size=(1, width)).astype(np.float32)
    if row in ("NaN among -inf", "all -inf"):
        z[:] = -np.inf
    at = width - 1 if row == "NaN among -inf" else width // 3
    if row == "NaN among -inf":
        z[0, at] = np.nan
    elif value is not None:
        z[0, at] = value
    y = jnp.array([width // 2])
    out = jax.jit(
        lambda z: (
            jsm.log_softmax(z),
            jsm.softmax(z),
            jsm.logsumexp(z, axis=-1),
            jsm.fused_cross_entropy(z, y),
            jsm.cross_entropy(z, y),
        )
    )(jnp.asarray(z))
    log_p, p, lse, fused, ref = map(np.asarray, out)
    if kind == "nan":
        # softmax is NaN at the entry (its other entries are 0 over a NaN sum, at every width)
        assert np.all(np.isnan(log_p)) and np.isnan(p[0, at])
        assert np.isnan(fused).all() and np.isnan(ref).all()
        # logsumexp of a row with +inf and no NaN is +inf (as jax.nn and scipy)
        assert np.all(lse == np.inf) if row == "+inf logit" else np.isnan(lse).all()
    else:
        assert np.all(log_p == -np.inf) and np.all(p == 0) and np.all(lse == -np.inf)
        assert np.all(fused == 0) and np.all(ref == 0)


def test_edge_rows_in_a_batch_that_xla_fuses_into_one_pass():
    """At ``[4096, 4096]`` XLA:CPU makes the whole softmax one fused reduction, whose ``min``
    and ``max`` drop NaN: a NaN or ``+inf`` row must still come out NaN, an empty row zeros with
    a finite gradient, and the other rows untouched."""
    z = np.random.default_rng(1).normal(size=(4096, 4096)).astype(np.float32)
    z[0, 17], z[1, 5], z[2], z[3, 9] = np.nan, np.inf, -np.inf, 40.0
    y = jnp.zeros(4096, jnp.int32).at[3].set(9)

    @jax.jit
    def everything(z):
        def total(z):
            return jnp.sum(jsm.softmax(z)[2:4]) + jnp.sum(jsm.log_softmax(z)[3])

        return (
            jsm.softmax(z),
            jsm.log_softmax(z),
            jsm.logsumexp(z, axis=-1),
            jax.grad(total)(z),
            jax.value_and_grad(lambda z: jnp.sum(jsm.fused_cross_entropy(z, y)[2:]))(z),
            jsm.fused_cross_entropy(z, y),
        )

    p, log_p, lse, g, (_, g_fused), fused = jax.tree.map(np.asarray, everything(jnp.asarray(z)))
    for row in (0, 1):
        assert np.isnan(p[row]).all() and np.isnan(log_p[row]).all()
        assert np.isnan(fused[row])
    # logsumexp: NaN for the NaN row, +inf for the +inf row (as jax.nn and scipy)
    assert np.isnan(lse[0]) and lse[1] == np.inf
    assert np.all(p[2] == 0) and np.all(log_p[2] == -np.inf) and lse[2] == -np.inf
    assert fused[2] == 0 and np.all(g[2] == 0) and np.all(g_fused[2] == 0)
    assert np.isfinite(g[3]).all() and np.isfinite(g_fused[3:]).all()
    want = oracle.log_softmax(z[3:])
    np.testing.assert_allclose(log_p[3:], want, rtol=LOSS_RTOL, atol=1e-6)
    np.testing.assert_allclose(p[3:], np.exp(want), rtol=2 * LOSS_RTOL, atol=1e-37)
    np.testing.assert_allclose(fused[3], -want[0, 9], rtol=LOSS_RTOL)
