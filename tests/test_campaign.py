"""Property-based campaign: random ranks, axes, sizes, options and adversarial values.

The losses run eagerly on a small pool of shapes, so JAX compiles each primitive for a handful
of shapes once and the examples themselves cost milliseconds (their options are static, so a
jitted cache would recompile for almost every example). The normalizers have no static options:
they run as one jitted program per axis, cached. Nothing is recompiled per example.
``HYPOTHESIS_PROFILE=ci`` (the default, derandomized) keeps the file fast;
``HYPOTHESIS_PROFILE=deep`` runs at least 5,000 examples per property on a wider shape pool.

Tolerances are derived from float32 rounding, not fitted: ``TOL_ULPS`` units of float32 epsilon
times the magnitude of the terms whose rounding adds up in that result (see :func:`_tolerances`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jsoftmax as jsm
from tests import oracle

EPS32 = float(np.finfo(np.float32).eps)
# float32 cannot hold magnitudes below its smallest normal number (XLA may flush subnormals to
# zero), so every comparison allows a few of them in absolute terms.
TINY32 = 4 * float(np.finfo(np.float32).tiny)
# How many float32 epsilons of the summed magnitudes a result may be off. The errors that add
# up are: one rounding of each d = z - m (relative |d| eps in exp(d), accounted for through the
# a·|d| terms below), at most C <= 5 roundings in each row sum, one in exp, one in log1p, and a
# few in the final combination.
TOL_ULPS = 32
INF, NAN = float("inf"), float("nan")

# A small pool of row layouts: eager JAX compiles each primitive once per shape, so in CI six
# layouts keep the whole file fast; the deep profile has the time for a wider pool.
DEEP = os.environ.get("HYPOTHESIS_PROFILE") == "deep"
if DEEP:
    CLASSES, BATCHES = (1, 2, 3, 5), ((), (1,), (3,), (4,), (2, 3))
else:
    CLASSES, BATCHES = (1, 3), ((), (3,), (2, 3))
REDUCTIONS = ("none", "sum", "mean")
IGNORE = (None, -100, 1)  # -100 as usual; 1 is a class id when C >= 2, out of range when C = 1
# Adversarial magnitudes: huge (±1e30, ±3e5, near exp's overflow and underflow), tiny (±1e-30,
# a subnormal) and exact zeros; drawing from a small set also makes exact ties common.
SPECIAL = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    20.0,
    -20.0,
    88.0,
    -88.0,
    104.0,
    -104.0,
    3e5,
    -3e5,
    1e30,
    -1e30,
    1e-30,
    -1e-30,
    1e-45,
)
LOSSES = {"reference": jsm.cross_entropy, "fused": jsm.fused_cross_entropy}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _where_shape(draw, shape: tuple, axis_pos: int) -> tuple:
    """A shape that broadcasts to ``shape``: full, per class only, or per example only (and,
    in the deep profile, any mix of full and size-1 dimensions)."""
    if DEEP:
        return tuple(n if draw(st.booleans()) else 1 for n in shape)
    how = draw(st.sampled_from(["full", "classes", "examples"]))
    if how == "full":
        return shape
    keep = (lambda i: i == axis_pos) if how == "classes" else (lambda i: i != axis_pos)
    return tuple(n if keep(i) else 1 for i, n in enumerate(shape))


def _values(nan: bool = False, posinf: bool = False, neginf: bool = True):
    parts = [st.floats(-30, 30, width=32), st.sampled_from(SPECIAL)]
    if neginf:
        parts.append(st.just(-INF))
    if posinf:
        parts.append(st.just(INF))
    if nan:
        parts.append(st.just(NAN))
    return st.one_of(*parts)


@dataclasses.dataclass
class Case:
    """One loss call: logits with the class axis at ``axis``, labels, and keyword options."""

    logits: np.ndarray  # float32
    labels: np.ndarray  # int32 [batch] or float32 like logits
    axis: int
    where: np.ndarray | None  # broadcastable to logits
    label_smoothing: float
    z_loss: float
    ignore_index: int | None
    reduction: str

    @property
    def kind(self) -> str:
        return "int" if self.labels.dtype.kind == "i" else "float"

    def kwargs(self) -> dict:
        kw = {
            "axis": self.axis,
            "label_smoothing": self.label_smoothing,
            "z_loss": self.z_loss,
            "reduction": self.reduction,
        }
        if self.where is not None:
            kw["where"] = self.where
        if self.ignore_index is not None:
            kw["ignore_index"] = self.ignore_index
        return kw

    def last(self):
        """Logits, labels and full mask with the class axis last (the oracle's layout)."""
        z = np.moveaxis(self.logits, self.axis, -1)
        mask = (
            np.ones(self.logits.shape, bool)
            if self.where is None
            else np.broadcast_to(self.where, self.logits.shape)
        )
        mask = np.moveaxis(mask, self.axis, -1)
        y = self.labels if self.kind == "int" else np.moveaxis(self.labels, self.axis, -1)
        return z, y, mask


@st.composite
def cases(draw, *, nan=False, posinf=False, bad_labels=True):
    """A loss call. ``bad_labels=False`` keeps integer labels inside the contract's domain."""
    c = draw(st.sampled_from(CLASSES))
    batch = draw(st.sampled_from(BATCHES))
    axis_pos = draw(st.integers(0, len(batch)))
    shape = batch[:axis_pos] + (c,) + batch[axis_pos:]
    axis = draw(st.sampled_from([axis_pos, axis_pos - len(shape)]))
    logits = draw(hnp.arrays(np.float32, shape, elements=_values(nan, posinf)))
    if draw(st.booleans()) and logits.size:  # exact ties along the class axis
        first = np.take(logits, [0], axis)
        logits = np.where(
            np.arange(c).reshape([-1 if i == axis_pos else 1 for i in range(len(shape))]) % 2 == 0,
            first,
            logits,
        )
    where = None
    if draw(st.booleans()):
        # broadcastable: every dimension is either full or 1
        wshape = _where_shape(draw, shape, axis_pos)
        where = draw(hnp.arrays(np.bool_, wshape, elements=st.booleans()))
        if draw(st.booleans()):
            where = np.broadcast_to(where, shape).copy()
            first_row = tuple(slice(None) if i == axis_pos else 0 for i in range(len(shape)))
            where[first_row] = False  # a fully masked row
    kind = draw(st.sampled_from(["int", "float"]))
    ignore_index = draw(st.sampled_from(IGNORE)) if kind == "int" else None
    if kind == "int":
        good = st.integers(0, c - 1)
        choices = [good, good, good]
        if ignore_index is not None:
            choices.append(st.just(ignore_index))
        if bad_labels:
            choices.append(st.sampled_from([-1, c, c + 7, -100]))
        labels = draw(hnp.arrays(np.int32, batch, elements=st.one_of(*choices)))
        if not bad_labels and where is not None:
            labels = _onto_included(labels, where, shape, axis_pos, ignore_index)
    else:
        elements = st.one_of(st.floats(0, 2, width=32), st.sampled_from([0.0, 1.0, 0.25, 1e-30]))
        labels = draw(hnp.arrays(np.float32, shape, elements=elements))
    return Case(
        logits=logits,
        labels=labels,
        axis=axis,
        where=where,
        label_smoothing=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.999))),
        z_loss=draw(st.one_of(st.just(0.0), st.sampled_from([1e-4, 1.0]), st.floats(0.0, 1.0))),
        ignore_index=ignore_index,
        reduction=draw(st.sampled_from(REDUCTIONS)),
    )


def _onto_included(labels, where, shape, axis_pos, ignore_index):
    """Move labels that point at an excluded class onto an included one (if the row has one)."""
    mask = np.moveaxis(np.broadcast_to(where, shape), axis_pos, -1)
    labels = labels.copy()
    for idx in np.ndindex(*labels.shape):
        lab = labels[idx]
        if lab == ignore_index or mask[idx][lab]:
            continue
        included = np.flatnonzero(mask[idx])
        if included.size:
            labels[idx] = included[0]
    return labels


# ---------------------------------------------------------------------------------- running


def run(fn, case: Case, dtype=jnp.float32):
    """Value and gradients (logits, and float labels) of ``fn``, eagerly, class axis last."""
    with np.errstate(over="ignore"):  # 16-bit dtypes turn 3e5 and 1e30 into inf, on purpose
        z = jnp.asarray(case.logits, dtype)
    kw = case.kwargs()
    if case.kind == "float":
        y = jnp.asarray(case.labels)
        out, pull = jax.vjp(lambda a, b: fn(a, b, **kw), z, y)
        gz, gy = pull(jnp.ones_like(out))
        gy = np.moveaxis(np.asarray(gy, np.float64), case.axis, -1)
    else:
        out, pull = jax.vjp(lambda a: fn(a, jnp.asarray(case.labels), **kw), z)
        (gz,), gy = pull(jnp.ones_like(out)), None
    gz = np.moveaxis(np.asarray(gz.astype(jnp.float32), np.float64), case.axis, -1)
    return np.asarray(out, np.float64), gz, gy


def _tolerances(case: Case):
    """Per-row value and per-element gradient tolerances, from float64 magnitudes.

    The loss is a sum of non-negative terms (``sum(y)·log1p(T)``, ``-y_i·d_i``, ``c·lse²``), so
    its error is relative to its own size, except for three things: the rounding of each
    ``d = z - m`` (relative ``|d|·eps`` in ``exp(d)``, hence the ``a_j·|d_j|`` terms), and the
    z-loss' ``lse = m + log1p(T)``, which cancels when ``m < 0`` (error ``eps·(|m| + |lse|)``).
    The gradient ``a_i·(sum y + 2c·lse) - y_i`` cancels when the two parts are close, so its
    error is relative to ``a_i·(...) + y_i``.
    """
    z, y, mask = case.last()
    zm = np.where(mask, np.asarray(z, np.float64), -INF)
    with np.errstate(all="ignore"):
        a = oracle.softmax(zm)
        m = np.max(zm, -1, keepdims=True)
        m = np.where(np.isneginf(m), 0.0, m)
        d = zm - m
        ad = np.where(a > 0, a * np.abs(d), 0.0)
        lse = np.abs(oracle.logsumexp(zm))[..., None]
        lse = np.where(np.isinf(lse), 0.0, lse)
        eps = case.label_smoothing
        if case.kind == "int":
            y_sum = np.ones(m.shape)
            y_el = np.where(np.arange(z.shape[-1]) == y[..., None], 1.0, 0.0) + eps
        else:
            yy = np.where(mask, np.abs(y.astype(np.float64)), 0.0)
            y_sum = np.sum(yy, -1, keepdims=True) + eps
            y_el = yy + eps
        c = case.z_loss
        zl = 2 * c * (lse + np.abs(m) + 1)
        grad_scale = (
            np.where(a > 0, a * (1 + np.abs(d)), 0.0) * (y_sum + zl)
            + y_el
            + a * y_sum * np.sum(ad, -1, keepdims=True)
        )
        value_scale = y_sum * np.sum(ad, -1, keepdims=True) + c * lse * (lse + np.abs(m) + 1)
    # A probability (or T) below float32's normal range may be flushed to 0, losing up to
    # TINY32 times what multiplies it: sum(y) in the loss, sum(y) + 2c·lse in the gradient.
    return (
        TOL_ULPS * EPS32 * value_scale[..., 0] + TINY32 * (1 + y_sum[..., 0]),
        TOL_ULPS * EPS32 * grad_scale + TINY32 * (1 + y_sum + zl),
    )


def assert_close(got, want, tol, what: str, rel: float = TOL_ULPS * EPS32):
    """NaN exactly where ``want`` has NaN, equal infinities, else within ``rel·|want| + tol``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    tol = np.broadcast_to(np.asarray(tol, np.float64), want.shape)
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_g, nan_w), f"{what}: NaN at {np.argwhere(nan_g != nan_w)[:4]}"
    inf = np.isinf(got) | np.isinf(want)
    assert np.array_equal(got[inf], want[inf]), f"{what}: inf {got[inf]} vs {want[inf]}"
    fin = ~(nan_g | inf)
    with np.errstate(invalid="ignore"):
        ok = (got == want) | (np.abs(got - want) <= rel * np.abs(want) + tol)
    bad = fin & ~ok
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        pytest.fail(
            f"{what}: at {i} got {got[i]!r}, want {want[i]!r} (tol {tol[i]:.3g}, "
            f"diff {abs(got[i] - want[i]):.3g})"
        )


def _reduce_tol(case: Case, row_tol, grad_tol):
    """Tolerances for the reduced value and the gradient of the reduced loss."""
    if case.reduction == "none":
        return row_tol, grad_tol
    scale = 1.0
    if case.reduction == "mean":
        count = row_tol.size
        if case.kind == "int" and case.ignore_index is not None:
            count = int(np.sum(case.labels != case.ignore_index))
        scale = 1.0 / max(count, 1)
    return np.sum(row_tol) * scale, grad_tol * scale


# --------------------------------------------------------------------------------- properties


@pytest.mark.usefixtures("formulation")
@given(case=cases(nan=True, posinf=True), dtype=st.sampled_from(list(DTYPES)))
def test_fused_equals_reference_in_value_and_gradient(case, dtype):
    # Any input at all, NaN and +inf included: the two implementations of one function must
    # agree, NaN for NaN and inf for inf.
    note(repr(case))
    v_ref, gz_ref, gy_ref = run(jsm.cross_entropy, case, DTYPES[dtype])
    v_fus, gz_fus, gy_fus = run(jsm.fused_cross_entropy, case, DTYPES[dtype])
    row_tol, grad_tol = _reduce_tol(case, *_tolerances(case))
    assert_close(v_fus, v_ref, row_tol, "value")
    if dtype != "float32":  # each gradient is rounded once to 16 bits: allow one 16-bit ulp
        ulp16 = float(jnp.finfo(DTYPES[dtype]).eps)
        grad_tol = grad_tol + 2 * ulp16 * np.abs(gz_ref)
    assert_close(gz_fus, gz_ref, grad_tol, "gradient wrt logits")
    if gy_ref is not None:
        assert_close(gy_fus, gy_ref, grad_tol, "gradient wrt labels")


@pytest.mark.usefixtures("formulation")
@given(case=cases())
def test_both_losses_equal_the_float64_oracle(case):
    # Domain: finite or -inf logits (NaN and +inf have no float64 answer to compare with; the
    # property above checks that both implementations agree on them). Bad labels, ignored and
    # empty rows are in: the oracle answers them from the contract's words. The oracle runs on
    # the same float32 inputs, and its answer is rounded to float32 before comparing, so that
    # an overflow to inf is the right answer where the float64 value exceeds float32's range.
    note(repr(case))
    z, y, mask = case.last()
    if case.kind == "float":
        # A soft target that float32 holds only as a subnormal ((1 - eps)·y below 1.2e-38) is
        # flushed to 0 by XLA, which turns a +inf (weight on a -inf logit) into 0·log 0 = 0:
        # float32 has no answer to compare with the oracle's there.
        target = (1 - case.label_smoothing) * y.astype(np.float64)
        assume(not np.any((target > 0) & (target < np.finfo(np.float32).tiny)))
    want_v, want_g, want_gy = oracle.cross_entropy(
        z,
        y,
        where=mask,
        label_smoothing=case.label_smoothing,
        ignore_index=case.ignore_index,
        z_loss=case.z_loss,
        reduction=case.reduction,
    )
    if case.reduction == "none":
        # the gradient of the "none" loss with a cotangent of ones is the gradient of the sum
        _, want_g, want_gy = oracle.cross_entropy(
            z,
            y,
            where=mask,
            label_smoothing=case.label_smoothing,
            ignore_index=case.ignore_index,
            z_loss=case.z_loss,
            reduction="sum",
        )
    row_tol, grad_tol = _reduce_tol(case, *_tolerances(case))
    with np.errstate(over="ignore"):
        want_v = np.float32(want_v) if np.ndim(want_v) == 0 else want_v.astype(np.float32)
    for name, fn in LOSSES.items():
        v, gz, gy = run(fn, case)
        assert_close(v, want_v, row_tol, f"{name} value")
        # Every gradient is compared, NaN rows (bad labels) and +inf rows (a positive weight
        # on a -inf logit, where the gradient is still a·sum(y) - y) included.
        assert_close(gz, want_g, grad_tol, f"{name} gradient wrt logits")
        if gy is not None:
            assert_close(gy, want_gy, grad_tol, f"{name} gradient wrt labels")


@st.composite
def poisoned(draw):
    """A case, the example to poison (class axis last) and how."""
    case = draw(cases(nan=True, posinf=True))
    z, y, mask = case.last()
    rows = z.shape[:-1]
    assume(math.prod(rows) >= 2)
    row = tuple(draw(st.integers(0, n - 1)) for n in rows)
    how = draw(st.sampled_from(["nan_logit", "posinf_logit", "nan_label", "bad_label"]))
    return case, row, how, draw(st.integers(0, z.shape[-1] - 1))


def _poison(case: Case, row, how, col) -> tuple[Case, Case]:
    """(clean, poisoned): the same call, with only example ``row`` changed in the second."""
    z, y, mask = case.last()
    clean_z, clean_y = z.copy(), y.copy()
    if case.kind == "int":
        # the example keeps a valid, not ignored label in the clean call, so the "mean"
        # counts it in both calls
        clean_y[row] = 0 if case.ignore_index != 0 else 1
    bad_z, bad_y = clean_z.copy(), clean_y.copy()
    if how == "nan_logit":
        bad_z[row + (col,)] = NAN
    elif how == "posinf_logit":
        bad_z[row + (col,)] = INF
    elif how == "nan_label" and case.kind == "float":
        bad_y[row + (col,)] = NAN
    else:
        bad_y[row] = z.shape[-1] + 3 if case.kind == "int" else NAN

    def back(zz, yy):
        labels = yy if case.kind == "int" else np.moveaxis(yy, -1, case.axis)
        return dataclasses.replace(case, logits=np.moveaxis(zz, -1, case.axis), labels=labels)

    return back(clean_z, clean_y), back(bad_z, bad_y)


@pytest.mark.usefixtures("formulation")
@given(p=poisoned())
def test_nan_in_one_example_never_reaches_another(p):
    # The other examples keep their value and gradient bit for bit; the poisoned example itself
    # is NaN in value and gradient whenever the poison takes part: a NaN or +inf logit on an
    # included class, or a NaN soft label or a bad class id in a row that has an included class.
    case, row, how, col = p
    note(f"{case!r} row={row} how={how} col={col}")
    clean, bad = _poison(case, row, how, col)
    z, _, mask = clean.last()
    if how in ("nan_logit", "posinf_logit"):
        takes_part = mask[row + (col,)]
    else:
        nonempty = np.any(mask[row] & (z[row] > -INF))
        takes_part = nonempty and (how == "bad_label" or case.kind == "int" or mask[row + (col,)])
    for name, fn in LOSSES.items():
        v0, g0, gy0 = run(fn, clean)
        v1, g1, gy1 = run(fn, bad)
        others = np.ones(g0.shape[:-1], bool)
        others[row] = False
        np.testing.assert_array_equal(g1[others], g0[others], err_msg=f"{name} gradient")
        if gy0 is not None:
            np.testing.assert_array_equal(gy1[others], gy0[others], err_msg=f"{name} dlabels")
        if case.reduction == "none":
            np.testing.assert_array_equal(v1[others], v0[others], err_msg=f"{name} value")
        if takes_part:
            value = v1[row] if case.reduction == "none" else v1
            assert np.isnan(value), f"{name}: the poisoned example's loss is {value}, not NaN"
            assert np.isnan(g1[row]).any(), f"{name}: the poisoned example's gradient has no NaN"


@pytest.mark.usefixtures("formulation")
@given(case=cases(bad_labels=False), dtype=st.sampled_from(list(DTYPES)))
def test_no_nan_for_inputs_inside_the_contract(case, dtype):
    # Domain: finite or -inf logits (finite after the cast to dtype), labels in range and on an
    # included class (or ignored), soft labels finite and >= 0. Empty rows, exact ties, huge and
    # tiny values are all inside it. The loss may be +inf (a positive weight on a -inf logit, or
    # a z-loss whose lse² overflows), never NaN; the gradient is never NaN.
    note(repr(case))
    # A 16-bit dtype turns 3e5 or 1e30 into +inf: such an input is outside the domain.
    with np.errstate(over="ignore"):
        assume(not np.any(np.asarray(jnp.asarray(case.logits, DTYPES[dtype])) == INF))
    for name, fn in LOSSES.items():
        v, gz, gy = run(fn, case, DTYPES[dtype])
        assert not np.isnan(v).any(), f"{name}: NaN loss"
        assert not np.isnan(gz).any(), f"{name}: NaN gradient wrt logits"
        if gy is not None:
            assert not np.isnan(gy).any(), f"{name}: NaN gradient wrt labels"


@st.composite
def label_arrays(draw):
    num_classes = draw(st.sampled_from(CLASSES + (6,)))
    ignore_index = draw(st.sampled_from([None, -100, 0, 2]))
    shape = draw(st.sampled_from(((0,),) + BATCHES))
    elements = st.one_of(st.integers(-3, num_classes + 3), st.sampled_from([-100, 2**31 - 1]))
    labels = draw(hnp.arrays(np.int32, shape, elements=elements))
    return labels, num_classes, ignore_index


@given(p=label_arrays())
def test_check_labels_catches_exactly_the_bad_labels(p):
    # Eagerly: an error exactly when some label is outside [0, C) and not ignore_index, whose
    # message counts them and names the first; good labels come back unchanged. (Under jit
    # through checkify: tests/test_bad_inputs.py and tests/test_edges.py.)
    labels, num_classes, ignore_index = p
    flat = labels.reshape(-1)
    bad = ((flat < 0) | (flat >= num_classes)) & (flat != ignore_index)
    if not bad.any():
        out = jsm.check_labels(jnp.asarray(labels), num_classes, ignore_index)
        np.testing.assert_array_equal(out, labels)
    else:
        first = int(np.argmax(bad))
        message = (
            f"labels: {int(bad.sum())} label(s) outside [0, {num_classes})"
            + ("" if ignore_index is None else f" and not ignore_index={ignore_index}")
            + f"; first bad label {int(flat[first])} at flat index {first}"
        )
        with pytest.raises(Exception) as info:
            jsm.check_labels(jnp.asarray(labels), num_classes, ignore_index)
        assert str(info.value).startswith(message), str(info.value)
    # The losses answer exactly these labels with NaN (finite logits, no mask).
    if labels.size and num_classes in CLASSES:
        logits = jnp.zeros(labels.shape + (num_classes,))
        loss = np.asarray(jsm.fused_cross_entropy(logits, labels, ignore_index=ignore_index))
        np.testing.assert_array_equal(np.isnan(loss).reshape(-1), bad)


@st.composite
def normalizer_cases(draw):
    c = draw(st.sampled_from(CLASSES))
    batch = draw(st.sampled_from(BATCHES))
    axis_pos = draw(st.integers(0, len(batch)))
    shape = batch[:axis_pos] + (c,) + batch[axis_pos:]
    x = draw(hnp.arrays(np.float32, shape, elements=_values()))
    where = None
    if draw(st.booleans()):
        wshape = _where_shape(draw, shape, axis_pos)
        where = draw(hnp.arrays(np.bool_, wshape, elements=st.booleans()))
    return x, axis_pos, where


NORMALIZERS = (jsm.softmax, jsm.log_softmax, jsm.logsumexp)


@functools.cache
def _normalizers(axis: int):
    """One jitted program per axis (jit caches it per shape): the three normalizers' values and
    gradients for a cotangent of ones. The normalizers have no static options, so the cache is
    shared by every example of both normalizer properties."""

    def evaluate(x, where):
        kw = {} if where is None else {"where": where}
        results = []
        for fn in NORMALIZERS:
            out, pull = jax.vjp(lambda v, fn=fn: fn(v, axis, **kw), x)
            results.append((out, pull(jnp.ones_like(out))[0]))
        return results

    return jax.jit(evaluate)


def _normalize(x, axis, where):
    """[(value, gradient)] of softmax, log_softmax, logsumexp, with the class axis last."""
    results = _normalizers(axis)(jnp.asarray(x), None if where is None else jnp.asarray(where))
    out = []
    for fn, (v, g) in zip(NORMALIZERS, results, strict=True):
        v = np.asarray(v, np.float64)
        out.append(
            (
                v if fn is jsm.logsumexp else np.moveaxis(v, axis, -1),
                np.moveaxis(np.asarray(g, np.float64), axis, -1),
            )
        )
    return out


@pytest.mark.usefixtures("formulation")
@given(p=normalizer_cases())
def test_normalizers_equal_the_float64_oracle(p):
    # Domain: finite or -inf entries. softmax is compared relative to the size of each
    # probability (|d|·eps from rounding d = x - max), log_softmax and logsumexp relative to the
    # size of the terms they add.
    x, axis, where = p
    note(f"x={x!r} axis={axis} where={where!r}")
    mask = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
    z = np.moveaxis(x, axis, -1)
    mask_last = np.moveaxis(mask, axis, -1)
    zm = np.where(mask_last, z.astype(np.float64), -INF)
    with np.errstate(all="ignore"):
        logp = oracle.log_softmax(zm)
        lse = oracle.logsumexp(zm)
        m = np.where(np.isneginf(np.max(zm, -1)), 0.0, np.max(zm, -1))
        a = np.exp(logp)
        ad = np.sum(np.where(a > 0, a * np.abs(zm - m[..., None]), 0.0), -1)
    (sm, g_sm), (ls, g_ls), (lz, g_lz) = _normalize(x, axis, where)
    tol = TOL_ULPS * EPS32
    d = np.where(a > 0, zm - m[..., None], 0.0)
    assert_close(sm, a, tol * a * (1 + np.abs(d)) + TINY32, "softmax")
    assert_close(ls, logp, tol * (1 + ad[..., None]), "log_softmax")
    assert_close(lz, lse, tol * (np.abs(m) + 1 + ad), "logsumexp")
    # No NaN in any gradient (a cotangent of ones); empty rows: exactly 0 / -inf, gradient 0.
    empty = ~np.any(np.isfinite(zm), -1)
    assert np.all(sm[empty] == 0) and np.all(ls[empty] == -INF) and np.all(lz[empty] == -INF)
    for fn, g in zip(NORMALIZERS, (g_sm, g_ls, g_lz), strict=True):
        assert not np.isnan(g).any(), f"{fn.__name__}: NaN gradient"
        assert np.all(g[empty] == 0), f"{fn.__name__}: gradient of an empty row"


@pytest.mark.usefixtures("formulation")
@given(p=normalizer_cases(), how=st.sampled_from(["nan", "posinf"]), pick=st.integers(0, 10**6))
def test_normalizers_keep_nan_in_its_row(p, how, pick):
    x, axis, where = p
    z = np.moveaxis(x, axis, -1)
    rows = z.shape[:-1]
    assume(math.prod(rows) >= 2)
    row = np.unravel_index(pick % math.prod(rows), rows)
    bad = z.copy()
    bad[row + (pick % z.shape[-1],)] = NAN if how == "nan" else INF
    bad = np.moveaxis(bad, -1, axis)
    note(f"x={x!r} axis={axis} where={where!r} row={row} how={how}")
    others = np.ones(rows, bool)
    others[row] = False
    for fn, (v0, g0), (v1, g1) in zip(
        NORMALIZERS, _normalize(x, axis, where), _normalize(bad, axis, where), strict=True
    ):
        np.testing.assert_array_equal(g1[others], g0[others], err_msg=fn.__name__)
        np.testing.assert_array_equal(v1[others], v0[others], err_msg=fn.__name__)
