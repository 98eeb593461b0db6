"""The fused VJP against autodiff of the reference, its full Jacobian, and a float64 oracle."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoftmax as jsm
from tests import oracle

B, C = 5, 7
OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.05},
    "where": {"where": True},
    "ignore_index": {"ignore_index": -100},
    "all": {"label_smoothing": 0.1, "z_loss": 0.02, "where": True, "ignore_index": -100},
}


def make_case(kind: str, opts: dict, seed: int = 0, shape=(B, C)):
    """Logits, labels and keyword options, with the class axis last."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape).astype(np.float32) * 2
    kw = dict(opts)
    mask = None
    if kw.pop("where", False):
        mask = rng.random(shape) > 0.3
        mask[..., 0] = True  # keep class 0 in, so every row has a label to point at
        kw["where"] = jnp.asarray(mask)
    if kind == "int":
        labels = rng.integers(0, shape[-1], size=shape[:-1])
        if mask is not None:
            labels = np.where(np.take_along_axis(mask, labels[..., None], -1)[..., 0], labels, 0)
        if kw.get("ignore_index") is not None:
            labels.reshape(-1)[1] = kw["ignore_index"]
        labels = jnp.asarray(labels, jnp.int32)
    else:
        kw.pop("ignore_index", None)
        labels = rng.random(shape).astype(np.float32)  # soft, rows do not sum to 1
        labels = jnp.asarray(labels)
    return jnp.asarray(logits), labels, kw


def loss_fn(fn, labels, kw, reduction):
    return lambda z: fn(z, labels, reduction=reduction, **kw)


def vjp_of(f, z, cot):
    out, pullback = jax.vjp(f, z)
    return out, pullback(cot)[0]


def jacfwd_vjp(f, z, cot):
    jac = jax.jacfwd(f)(z)  # [*out, *in]
    out_nd = np.ndim(cot)
    return jnp.tensordot(cot, jac, axes=out_nd) if out_nd else cot * jac


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_fused_vjp_matches_grad_jacfwd_and_oracle(opt, kind, reduction):
    logits, labels, kw = make_case(kind, OPTIONS[opt])
    fused = loss_fn(jsm.fused_cross_entropy, labels, kw, reduction)
    ref = loss_fn(jsm.cross_entropy, labels, kw, reduction)
    rng = np.random.default_rng(1)
    out = ref(logits)
    cot = jnp.asarray(rng.normal(size=np.shape(out)).astype(np.float32))
    val_f, g_f = vjp_of(fused, logits, cot)
    val_r, g_r = vjp_of(ref, logits, cot)
    g_j = jacfwd_vjp(ref, logits, cot)
    np.testing.assert_allclose(val_f, val_r, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(g_f, g_r, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(g_f, g_j, rtol=1e-5, atol=2e-6)
    # the float64 oracle, written from the contract alone
    mask = kw.get("where")
    o_loss, o_grad, _ = oracle.cross_entropy(
        np.asarray(logits),
        np.asarray(labels),
        where=None if mask is None else np.asarray(mask),
        label_smoothing=kw.get("label_smoothing", 0.0),
        ignore_index=kw.get("ignore_index"),
        z_loss=kw.get("z_loss", 0.0),
        reduction=reduction,
    )
    np.testing.assert_allclose(val_f, o_loss, rtol=2e-6, atol=1e-7)
    o_cot = np.asarray(cot)[..., None] if reduction == "none" else np.asarray(cot)
    np.testing.assert_allclose(g_f, o_grad * o_cot, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("opt", ["plain", "smoothing", "where", "all"])
def test_fused_label_grad_matches_autodiff_and_oracle(opt):
    logits, labels, kw = make_case("float", OPTIONS[opt], seed=3)
    g_f = jax.grad(lambda y: jsm.fused_cross_entropy(logits, y, reduction="sum", **kw))(labels)
    g_r = jax.grad(lambda y: jsm.cross_entropy(logits, y, reduction="sum", **kw))(labels)
    g_j = jax.jacfwd(lambda y: jsm.cross_entropy(logits, y, reduction="sum", **kw))(labels)
    np.testing.assert_allclose(g_f, g_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_f, g_j, rtol=1e-5, atol=1e-6)
    mask = kw.get("where")
    _, _, o_lab = oracle.cross_entropy(
        np.asarray(logits),
        np.asarray(labels),
        where=None if mask is None else np.asarray(mask),
        label_smoothing=kw.get("label_smoothing", 0.0),
        z_loss=kw.get("z_loss", 0.0),
        reduction="sum",
    )
    np.testing.assert_allclose(g_f, o_lab, rtol=1e-5, atol=1e-6)


def test_integer_labels_get_a_float0_cotangent():
    logits, labels, _ = make_case("int", {})
    grad = jax.jit(jax.grad(jsm.fused_cross_entropy, argnums=(0, 1), allow_int=True))
    _, g_lab = grad(logits[0], labels[0])
    assert g_lab.dtype == jax.dtypes.float0


@pytest.mark.parametrize("axis", [0, 1, -3])
@pytest.mark.parametrize("kind", ["int", "float"])
def test_fused_matches_reference_on_any_class_axis(axis, kind):
    rng = np.random.default_rng(2)
    shape = (3, 4, 6)
    logits = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    ax = axis % 3
    if kind == "int":
        label_shape = shape[:ax] + shape[ax + 1 :]
        labels = jnp.asarray(rng.integers(0, shape[ax], size=label_shape), jnp.int32)
    else:
        labels = jnp.asarray(rng.random(shape).astype(np.float32))
    kw = dict(axis=axis, label_smoothing=0.1, z_loss=0.01, reduction="none")
    cot = jnp.asarray(rng.normal(size=shape[:ax] + shape[ax + 1 :]).astype(np.float32))

    # One compiled program for the fused and reference VJPs and the class-axis-last call: a new
    # layout costs hundreds of eager per-primitive compilations, one jit compiles once.
    @jax.jit
    def run(logits, labels, cot):
        fused = vjp_of(lambda z: jsm.fused_cross_entropy(z, labels, **kw), logits, cot)
        ref = vjp_of(lambda z: jsm.cross_entropy(z, labels, **kw), logits, cot)
        moved = jnp.moveaxis(logits, axis, -1)
        lab_moved = labels if kind == "int" else jnp.moveaxis(labels, axis, -1)
        last = jsm.fused_cross_entropy(moved, lab_moved, **dict(kw, axis=-1))
        return fused, ref, last

    (v_f, g_f), (v_r, g_r), v_last = run(logits, labels, cot)
    np.testing.assert_allclose(v_f, v_r, rtol=2e-6)
    np.testing.assert_allclose(g_f, g_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v_f, v_last, rtol=1e-6)


TRANSFORMS = {
    "eager": lambda f: f,
    "jit": jax.jit,
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("kind", ["int", "float"])
def test_fused_value_and_grad_same_under_jit_and_vmap(transform, kind):
    logits, labels, kw = make_case(kind, OPTIONS["all"], seed=5)
    f = functools.partial(jsm.fused_cross_entropy, reduction="none", **kw)

    def total(z):
        return jnp.sum(f(z, labels) * jnp.arange(1, B + 1))

    v, g = TRANSFORMS[transform](jax.value_and_grad(total))(logits)
    v_r, g_r = jax.value_and_grad(
        lambda z: jnp.sum(
            jsm.cross_entropy(z, labels, reduction="none", **kw) * jnp.arange(1, B + 1)
        )
    )(logits)
    np.testing.assert_allclose(v, v_r, rtol=2e-6)
    np.testing.assert_allclose(g, g_r, rtol=1e-5, atol=1e-6)
    # vmap over the batch: one example at a time, mask included
    mask = kw.pop("where")
    per_row = jax.vmap(
        lambda z, y, w: jax.grad(lambda z: jsm.fused_cross_entropy(z, y, where=w, **kw))(z)
    )(logits, labels, mask)
    full = jax.grad(lambda z: jnp.sum(jsm.fused_cross_entropy(z, labels, where=mask, **kw)))(logits)
    np.testing.assert_allclose(per_row, full, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["int", "float"])
def test_check_grads_rev_for_fused_and_all_modes_for_reference(kind, x64):
    logits, labels, kw = make_case(kind, OPTIONS["all"], seed=7)
    logits = logits.astype(jnp.float64)
    if kind == "float":
        labels = labels.astype(jnp.float64)
    kw["where"] = kw["where"]
    # Jitted: check_grads evaluates dozens of times; op-by-op dispatch would dominate.
    fused = jax.jit(lambda z: jsm.fused_cross_entropy(z, labels, reduction="sum", **kw))
    ref = jax.jit(lambda z: jsm.cross_entropy(z, labels, reduction="sum", **kw))
    check_grads(fused, (logits,), order=2, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)
    check_grads(ref, (logits,), order=2, modes=["fwd", "rev"], eps=1e-4, atol=1e-6, rtol=1e-6)
    if kind == "float":
        check_grads(
            jax.jit(lambda y: jsm.fused_cross_entropy(logits, y, reduction="sum", **kw)),
            (labels,),
            order=1,
            modes=["rev"],
            eps=1e-4,
            atol=1e-6,
            rtol=1e-6,
        )


@pytest.mark.parametrize("kind", ["int", "float"])
def test_fused_hessian_matches_reference_hessian(kind):
    logits, labels, kw = make_case(kind, {"label_smoothing": 0.1, "where": True}, seed=9)
    fused = lambda z: jsm.fused_cross_entropy(z, labels, reduction="sum", **kw)  # noqa: E731
    ref = lambda z: jsm.cross_entropy(z, labels, reduction="sum", **kw)  # noqa: E731
    # Jitted: both Hessians in one program (eagerly, every batched primitive compiles alone).
    h_f, h_r = jax.jit(lambda z: (jax.jacrev(jax.grad(fused))(z), jax.hessian(ref)(z)))(logits)
    np.testing.assert_allclose(h_f, h_r, rtol=1e-5, atol=1e-6)
    # per row it is sum(y) (diag(a) - a a^T)
    a = jsm.softmax(logits, where=kw["where"])
    if kind == "int":
        sum_y = np.ones(B)
    else:
        mask = np.asarray(kw["where"])
        finite = mask
        y = np.where(mask, np.asarray(labels), 0)
        sum_y = ((1 - 0.1) * y + 0.1 * finite / finite.sum(-1, keepdims=True)).sum(-1)
    for b in range(B):
        expected = sum_y[b] * (np.diag(a[b]) - np.outer(a[b], a[b]))
        np.testing.assert_allclose(h_f[b, :, b, :], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fn", [jsm.cross_entropy, jsm.fused_cross_entropy])
def test_16bit_logits_compute_in_float32(fn, dtype):
    logits, labels, _ = make_case("int", {}, seed=11)
    low = logits.astype(dtype)
    loss, grad = jax.value_and_grad(lambda z: fn(z, labels, reduction="mean"))(low)
    assert loss.dtype == jnp.float32
    assert grad.dtype == dtype
    loss32, grad32 = jax.value_and_grad(lambda z: fn(z, labels, reduction="mean"))(
        low.astype(jnp.float32)
    )
    np.testing.assert_allclose(loss, loss32, rtol=1e-6)
    np.testing.assert_allclose(grad.astype(np.float32), grad32, rtol=1e-2, atol=1e-3)


def test_float64_logits_stay_float64(x64):
    logits, labels, _ = make_case("int", {}, seed=12)
    loss = jax.jit(jsm.fused_cross_entropy)(logits.astype(jnp.float64), labels)
    assert loss.dtype == jnp.float64


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-4}])
def test_fused_forward_saves_only_the_logits_and_per_row_statistics(dtype, options):
    """Residuals of the fused loss: the logits as given, the labels, and O(rows) numbers."""
    from jax._src.ad_checkpoint import saved_residuals

    rows, classes = 16, 512
    logits = jnp.zeros((rows, classes), dtype)
    labels = jnp.zeros((rows,), jnp.int32)
    loss = lambda z: jsm.fused_cross_entropy(z, labels, reduction="mean", **options)  # noqa: E731
    saved = saved_residuals(loss, logits)
    full = [(aval, why) for aval, why in saved if aval.size >= rows * classes]
    # Exactly one full-size residual: the logits argument itself, in its own dtype (no float32
    # copy of bf16 logits, no probabilities).
    assert len(full) == 1, saved
    assert full[0][0].dtype == dtype and "argument" in full[0][1], saved
    for aval, _ in saved:
        assert aval.size in (rows * classes, rows, 1) or aval.size <= rows, saved


def test_fused_value_and_grad_allocates_no_extra_logit_sized_temporaries():
    """Compiled value_and_grad: besides the gradient it returns, at most one [rows, classes]
    float32 temporary (XLA's choice for small shapes), never the probabilities and d both."""
    rows, classes = 4096, 4096
    z = jax.ShapeDtypeStruct((rows, classes), jnp.float32)
    y = jax.ShapeDtypeStruct((rows,), jnp.int32)
    vg = jax.jit(jax.value_and_grad(lambda z, y: jsm.fused_cross_entropy(z, y, reduction="mean")))
    mem = vg.lower(z, y).compile().memory_analysis()
    logit_bytes = rows * classes * 4
    assert mem.temp_size_in_bytes <= 2 * logit_bytes + 2**20, mem


def _logit_sized_exponentials(hlo_text: str, size: int) -> int:
    """How many ``exponential`` ops in an optimized HLO module produce ``size`` elements."""
    count = 0
    for line in hlo_text.splitlines():
        found = re.search(r"= \w+\[([\d,]*)\][^ ]* exponential\(", line)
        if found and math.prod(int(d) for d in found.group(1).split(",") if d) == size:
            count += 1
    return count


@pytest.mark.parametrize("shape", [(256, 1024), (32, 32768)])
def test_fused_value_and_grad_exponentiates_the_logits_once(shape):
    """value_and_grad of the fused loss (float32, integer labels): the forward rule spells
    exp(z - m) as the backward rule does, so XLA computes it once, in the gradient's buffer,
    with no logit-sized temporary (computing it in each pass, as before, shows 2 here)."""
    rows, classes = shape
    z = jax.ShapeDtypeStruct(shape, jnp.float32)
    y = jax.ShapeDtypeStruct((rows,), jnp.int32)
    loss = lambda z, y: jsm.fused_cross_entropy(z, y, reduction="mean")  # noqa: E731
    vg = jax.jit(jax.value_and_grad(loss)).lower(z, y).compile()
    assert _logit_sized_exponentials(vg.as_text(), rows * classes) == 1
    assert vg.memory_analysis().temp_size_in_bytes <= 0.25 * rows * classes * 4
    # Alone: the same one exp, fused into the block sums (nothing logit-sized is written).
    alone = jax.jit(loss).lower(z, y).compile()
    assert _logit_sized_exponentials(alone.as_text(), rows * classes) == 1
    assert alone.memory_analysis().temp_size_in_bytes <= 0.25 * rows * classes * 4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_logits_take_their_row_max_without_a_float32_copy(dtype):
    """16-bit logits: the row max is taken in their own dtype (the same number), so XLA writes
    at most one float32 copy of them (for the block sums), not a second one for the max."""
    rows, classes = 1024, 4096
    z = jax.ShapeDtypeStruct((rows, classes), dtype)
    y = jax.ShapeDtypeStruct((rows,), jnp.int32)
    programs = {
        "fused value_and_grad": jax.value_and_grad(
            lambda z, y: jsm.fused_cross_entropy(z, y, reduction="mean")
        ),
        "log_softmax": lambda z, y: jsm.log_softmax(z),
        "softmax": lambda z, y: jsm.softmax(z),
    }
    float32_copy = rows * classes * 4
    for name, fn in programs.items():
        mem = jax.jit(fn).lower(z, y).compile().memory_analysis()
        assert mem.temp_size_in_bytes <= 1.1 * float32_copy, (name, mem)
