r"""Accuracy in float32 ulps against a 50-digit mpmath reference: jsoftmax, optax and jax.nn.

Every output is compared with the exact value of the same function *of the same float32
inputs*, computed with mpmath at 50 significant digits. The error of one output is

.. math::

   \mathrm{err} = \frac{|\mathrm{got} - \mathrm{exact}|}{\mathrm{ulp}(\mathrm{exact})},
   \qquad \mathrm{ulp}(x) = \texttt{np.spacing(np.float32(|x|))},

so it is measured against the subnormal spacing :math:`2^{-149}` when the exact value is below
the smallest normal float32. An exact 0 or :math:`\pm\infty` must be returned exactly (error 0,
else ``inf``). An exact value so small that it rounds to float32 0 (a probability of
:math:`10^{-300}`) is right when the output is 0 or within the target in subnormal spacings.
An exact *subnormal* value returned as 0 is counted apart as "flushed": XLA:CPU flushes
denormals to zero (FTZ/DAZ) in every compiled kernel, whatever the library.

The domain is adversarial by design (float32 inputs, 2 to 2000 classes):

* ``confident``: the label is the max and the loss is :math:`10^{-1} \dots 10^{-30}`, at offsets
  up to :math:`\pm 3\cdot 10^5`;
* ``confident-wrong``: the same rows with a label far below the max;
* ``ties``: exact ties among the maxima (2, half, or all classes), the label on a tied max or not;
* ``near-ties``: two maxima one ulp apart;
* ``inexact-shift``: confident rows whose ``z - m`` (64 to 87 below the max) is not a float32,
  built so that rounding it costs the most: the limit of any method that rounds ``z - m``;
* ``huge``: logits uniform in :math:`[-3\cdot 10^5, 3\cdot 10^5]`, and small spreads around big
  offsets (``[1e4, 1e4 + 1, ...]``), where ``logsumexp(z) - z_y`` loses digits;
* ``subnormal-tail``: confident rows whose sum below the max is a normal number made partly of
  subnormal terms (``[0, -69, -87.4, ..., -88.5]``), which a flush-to-zero platform drops;
* ``-inf``: rows with some (or all but one) entries ``-inf``;
* ``random``: normal logits at scales :math:`10^{-3} \dots 10^3`;
* ``flat-tail``: confident rows of 1024 classes with a long flat tail (``[0, -18, -30 x 1022]``,
  or three classes near the max), at offsets 0, +7 and -100: a sum of 1022 equal tiny terms
  next to a larger one, which one long chain of float32 additions gets wrong by up to 490 ulp;
* a few rows of 2000 classes from each family.

Soft labels (Dirichlet, smoothed one-hot, one-hot, two-way splits) are non-negative, so the
soft-label loss :math:`\sum_i y_i(\log Z - d_i)` is a sum of non-negative terms: no cancellation,
and the exact value is well-conditioned.

Measured: ``log_softmax``, ``softmax``, the loss (integer and soft labels; ``cross_entropy``
and ``fused_cross_entropy``), the gradient of ``fused_cross_entropy`` and the autodiff gradient
of ``cross_entropy`` (reported apart: it is the reference definition differentiated by JAX,
and ``a_y - 1`` there is formed as ``a_y + (-1)``); and the same for optax
(``softmax_cross_entropy_with_integer_labels``, ``softmax_cross_entropy``, ``jax.grad``) and
jax.nn (``log_softmax``, ``softmax``, and the loss ``-log_softmax(z)[y]`` with its gradient).

The linear head ``jsm.linear_cross_entropy`` is measured on the same rows, fed through it with
``x`` = identity rows and ``w`` = the logits, so that ``x @ w`` is exact: its loss and its gradient
with respect to ``w`` are then the loss and the logits' gradient. ``reduction="none"`` runs its
two-pass schedule (loss and gradient), ``"sum"`` its one-pass one (gradient). A row with ``-inf``
logits goes through alone, with its ``-inf`` entries in the bias (``0 * -inf`` would be NaN).

Example::

    python experiments/accuracy.py            # ~1 minute on 2 CPU cores
    python experiments/accuracy.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import optax
from tqdm import tqdm

import jsoftmax as jsm

DPS = 50  # significant digits of the reference
F32 = np.float32
TINY = float(np.finfo(F32).tiny)  # smallest normal float32
LOST_DIGITS_RTOL = 1e-3  # "digits lost": fewer than 3 correct significant digits
TARGETS = {
    "loss": 64.0,
    "soft loss": 64.0,
    "log_softmax": 64.0,
    "softmax": 128.0,
    "gradient": 128.0,
}

# --------------------------------------------------------------------------------- the domain


@dataclass(frozen=True)
class Row:
    """One example: float32 logits, an integer label and a soft target of the same length."""

    family: str
    z: np.ndarray  # float32 [C]
    label: int
    soft: np.ndarray  # float32 [C], non-negative, 0 where z is -inf


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(F32)


def _soft_target(rng: np.random.Generator, z: np.ndarray, label: int) -> np.ndarray:
    """One of four kinds of non-negative target; zero on ``-inf`` logits."""
    c = z.size
    kind = rng.integers(4)
    if kind == 0:
        y = rng.dirichlet(np.full(c, 0.3))
    elif kind == 1:  # label smoothing
        y = np.full(c, 0.1 / c)
        y[label] += 0.9
    elif kind == 2:  # one-hot as floats: the tiny-loss case for confident rows
        y = np.zeros(c)
        y[label] = 1.0
    else:  # a two-way split
        y = np.zeros(c)
        other = int(rng.integers(c))
        y[label] += 0.75
        y[other] += 0.25
    y = np.where(np.isneginf(z), 0.0, y)
    return _f32(y)


def _confident(rng, c: int, offset: float, k: float, label_is_max: bool) -> tuple[np.ndarray, int]:
    """A row whose loss (label = the max) is about ``10**-k``: others ``gap`` or more below."""
    gap = math.log(c - 1) + k * math.log(10.0)
    d = -(gap + rng.uniform(0.0, 0.5, c))
    top = int(rng.integers(c))
    d[top] = 0.0
    z = _f32(np.float64(F32(offset)) + d)
    z[top] = F32(offset)
    if label_is_max:
        return z, top
    return z, int(rng.choice([i for i in range(c) if i != top]))


def _ties(rng, c: int, t: int, offset: float, gap: float) -> np.ndarray:
    m = F32(offset)
    z = _f32(np.float64(m) - gap * rng.uniform(0.5, 1.5, c))
    z[rng.permutation(c)[:t]] = m
    z = np.minimum(z, m)  # rounding at a huge offset may have reached the max: that is a tie too
    return z


def _inexact_shift(rng, c: int, k: int, frac: float) -> tuple[np.ndarray, int]:
    r"""A confident row where ``z - m`` is not a float32 and ``e^{z - m}`` sits just below
    :math:`2^{k+1}`.

    The max ``m`` lies in [1, 2) with its bits below :math:`2^{-17}` equal to :math:`2^{-18}`, so
    rounding ``d = z - m`` (an exponent of 64 ... 87) to float32 moves it by exactly half an
    ulp, :math:`2^{-18}`: a relative change of :math:`2^{-18}` in :math:`e^d`, which is 64 ulps of
    a result whose mantissa is close to 2. The loss is :math:`\approx e^d \approx 2^{k+1}`.
    """
    m = F32(1 + int(rng.integers(1, 2**6)) * 2.0**-17 + 2.0**-18)
    z = _f32(np.float64(m) + (k + 1 - frac) * math.log(2.0) - 40.0 - rng.uniform(0.0, 1.0, c))
    top, other = rng.permutation(c)[:2]
    z[top] = m
    z[other] = F32(np.float64(m) + (k + 1 - frac) * math.log(2.0))
    return z, int(top)


def _subnormal_tail(rng, c: int, second: float) -> tuple[np.ndarray, int]:
    """A confident row whose sum below the max is normal but most of its terms are subnormal.

    Logits ``[0, second, -87.4 ... -88.5]`` with the label on the max: the loss is about
    ``e^second`` plus ``C - 2`` subnormal terms of 6e-39 to 1.1e-38 each. A platform that
    flushes subnormal numbers to zero drops them: with 2000 classes and ``second = -69`` that is
    a relative 1e-5 of a loss of 1e-30.
    """
    z = _f32(-rng.uniform(87.4, 88.5, c))  # e^-87.34 is the smallest normal float32
    top, other = rng.permutation(c)[:2]
    z[top], z[other] = 0.0, F32(second)
    return z, int(top)


# e^FLAT_TAIL is 52.48 ulp of e^-18: one chain of float32 additions of 1022 such terms to e^-18
# rounds each down by 0.48 ulp, 490 ulp in all.
FLAT_TAIL = -30.003780364990234


def _flat_tail(c: int, tail: float, offset: float, near: bool) -> tuple[np.ndarray, int]:
    """A confident row of ``c`` classes with a long flat tail: the label at the max, one class
    (``near``: three) close to it, and ``c - 2`` classes at one low logit, ``[0, -18, tail ...]``
    shifted by ``offset``. Its loss is a sum of ``c - 2`` equal tiny terms next to a larger one,
    which one long chain of additions gets wrong by hundreds of ulps."""
    z = np.full(c, tail)
    if near:
        z[:3] = (0.0, -1.0, -2.0)
    else:
        z[:2] = (0.0, -18.0)
    return _f32(z + offset), 0


def build_domain(seed: int, rows: int, quick: bool) -> list[Row]:
    """The adversarial grid plus ``rows`` random rows, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[Row] = []

    def add(family: str, z: np.ndarray, label: int) -> None:
        z = np.asarray(z, F32)
        out.append(Row(family, z, int(label), _soft_target(rng, z, int(label))))

    # Every class count is one more compilation (seconds on a CPU): quick mode uses one.
    small = (10,) if quick else (2, 3, 10, 100)
    offsets = (0.0, 1e4, 3e5) if quick else (0.0, 0.7310586, -13.25, 97.3, 1e4, -1e4, 2.99e5, -3e5)
    exponents = (1, 9, 20, 30) if quick else tuple(range(1, 31))
    for c in small:
        for offset in offsets:
            for k in exponents:
                add("confident", *_confident(rng, c, offset, k, True))
    for c in small[-2:]:
        for offset in offsets[::2]:
            for k in (5, 30) if quick else (2, 5, 15, 30):
                add("confident-wrong", *_confident(rng, c, offset, k, False))

    tie_offsets = (0.0, 3e5) if quick else (0.0, 1.5, -7.25, 1e4, 3e5, -3e5)
    for c in small:
        for t in sorted({2, max(2, c // 2), c}):
            for offset in tie_offsets:
                for gap in (1.0,) if t == c else ((1.0, 70.0) if quick else (1.0, 20.0, 70.0)):
                    z = _ties(rng, c, t, offset, gap)
                    tied = np.flatnonzero(z == z.max())
                    add("ties", z, rng.choice(tied))
                    if t < c:
                        add("ties", z, rng.choice(np.flatnonzero(z < z.max())))

    for c in small[:1] + small[2:3]:
        for m in (1.0, 1e4, 3e5) if quick else (0.1, 1.0, 1e4, 3e5, -3e5):
            m = F32(m)
            z = _f32(np.float64(m) - rng.uniform(0.5, 5.0, c))
            z[0], z[1] = m, np.nextafter(m, F32(-np.inf))
            for label in (0, 1):
                add("near-ties", z, label)

    for c in small:  # [1e4, 1e4 + 1, ...]: logsumexp(z) - z_y keeps only 3 digits of a small loss
        for offset in (1e4, -1e4, 1e5, 3e5):
            z = _f32(offset + np.arange(c) % 8)
            add("huge", z, int(np.argmax(z)))
            add("huge", _f32(offset + rng.normal(0.0, 4.0, c)), int(rng.integers(c)))
        z = _f32(rng.uniform(-3e5, 3e5, c))
        add("huge", z, int(np.argmax(z)))
        add("huge", z, int(rng.integers(c)))

    for c in small[:1] + small[2:3]:
        for k in (-125, -110, -93) if quick else range(-125, -92, 4):
            for frac in (0.001, 0.004):
                add("inexact-shift", *_inexact_shift(rng, c, k, frac))

    for c in small[-1:] if quick else (3, 100):
        for second in (-69.0, -80.0):  # losses 1e-30 and 1.8e-35
            add("subnormal-tail", *_subnormal_tail(rng, c, second))

    for n_inf in (1, 5, 9):  # 9 of 10 -inf: the one finite entry has probability 1 exactly
        z = _f32(rng.normal(0.0, 3.0, 10))
        z[rng.permutation(10)[:n_inf]] = -np.inf
        finite = np.flatnonzero(np.isfinite(z))
        add("-inf", z, rng.choice(finite))

    scales = (1e-3, 0.1, 1.0, 10.0, 100.0, 1e3)
    for i in range(rows):
        c = small[i % len(small)]
        z = _f32(rng.normal(0.0, scales[(i // len(small)) % len(scales)], c))
        add("random", z, int(rng.integers(c)))

    flat = (
        ((0.0, FLAT_TAIL, False), (-100.0, -30.0, False))
        if quick
        else tuple(
            (offset, tail, near)
            for offset in (0.0, 7.0, -100.0)  # -100: every logit below -88
            for tail in (-30.0, FLAT_TAIL)
            for near in (False, True)
        )
    )
    for offset, tail, near in flat:
        add("flat-tail", *_flat_tail(1024, tail, offset, near))

    if quick:
        return out
    wide = 2000  # a few wide rows from each family
    add("confident", *_confident(rng, wide, 0.25, 20, True))
    add("confident", *_confident(rng, wide, 0.25, 30, True))
    add("confident", *_confident(rng, wide, -1e4, 9, True))
    add("confident-wrong", *_confident(rng, wide, 3e5, 5, False))
    z = _ties(rng, wide, 2, 1e4, 20.0)
    add("ties", z, int(np.argmax(z)))
    add("huge", _f32(1e4 + rng.normal(0.0, 2.0, wide)), int(rng.integers(wide)))
    add("huge", _f32(rng.uniform(-3e5, 3e5, wide)), int(rng.integers(wide)))
    add("random", _f32(rng.normal(0.0, 1.0, wide)), int(rng.integers(wide)))
    add("random", _f32(rng.normal(0.0, 10.0, wide)), int(rng.integers(wide)))
    add("subnormal-tail", *_subnormal_tail(rng, wide, -69.0))
    return out


# ------------------------------------------------------------------------------ the reference


def reference(row: Row) -> dict[str, Any]:
    """Exact (50-digit) outputs of one row, rounded to float64 at the very end.

    Float64 keeps ~2e-9 ulp of a float32 result, so the errors computed from it are exact to
    the digits that are printed.
    """
    with mpmath.workdps(DPS):
        z = [mpmath.mpf(float(v)) for v in row.z]
        m = max(z)
        d = [v - m for v in z]
        e = [mpmath.exp(v) for v in d]
        total = mpmath.fsum(e)
        log_z = mpmath.log(total)
        y = row.label
        # 1 - a_y as a sum of the other terms: no cancellation even at a_y = 1 - 1e-30.
        others = mpmath.fsum(e[:y] + e[y + 1 :])
        probs = [v / total for v in e]
        grad = list(probs)
        grad[y] = -others / total
        soft = mpmath.fsum(
            mpmath.mpf(float(w)) * (log_z - dv) for w, dv in zip(row.soft, d, strict=True) if w != 0
        )
        return {
            "log_softmax": np.array([float(v - log_z) for v in d]),
            "softmax": np.array([float(v) for v in probs]),
            "loss": np.array([float(log_z - d[y])]),
            "soft loss": np.array([float(soft)]),
            "gradient": np.array([float(v) for v in grad]),
        }


# ------------------------------------------------------------------------------- the candidates


@dataclass(frozen=True)
class Measure:
    library: str
    name: str  # shown in tables
    quantity: str  # key of the reference and of TARGETS
    # (z, labels, soft) -> [n] or [n, C]; None for the linear head (see evaluate_linear)
    fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None
    held_to_target: bool = True


def _grad(loss: Callable[[jax.Array, jax.Array], jax.Array]):
    g = jax.grad(lambda z, y: jnp.sum(loss(z, y)))
    return lambda z, y, s: g(z, y)


def _jax_nn_loss(z, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=-1)[:, 0]


MEASURES: tuple[Measure, ...] = (
    Measure("jsoftmax", "loss, integer labels", "loss", lambda z, y, s: jsm.cross_entropy(z, y)),
    Measure(
        "jsoftmax",
        "loss, integer labels (fused)",
        "loss",
        lambda z, y, s: jsm.fused_cross_entropy(z, y),
    ),
    Measure("jsoftmax", "loss, soft labels", "soft loss", lambda z, y, s: jsm.cross_entropy(z, s)),
    Measure(
        "jsoftmax",
        "loss, soft labels (fused)",
        "soft loss",
        lambda z, y, s: jsm.fused_cross_entropy(z, s),
    ),
    Measure("jsoftmax", "log_softmax", "log_softmax", lambda z, y, s: jsm.log_softmax(z)),
    Measure("jsoftmax", "softmax", "softmax", lambda z, y, s: jsm.softmax(z)),
    Measure("jsoftmax", "gradient, integer labels", "gradient", _grad(jsm.fused_cross_entropy)),
    Measure(
        "jsoftmax",
        "gradient, integer labels (jax.grad of cross_entropy)",
        "gradient",
        _grad(jsm.cross_entropy),
        held_to_target=False,
    ),
    Measure(
        "optax",
        "loss, integer labels",
        "loss",
        lambda z, y, s: optax.softmax_cross_entropy_with_integer_labels(z, y),
    ),
    Measure(
        "optax", "loss, soft labels", "soft loss", lambda z, y, s: optax.softmax_cross_entropy(z, s)
    ),
    Measure(
        "optax",
        "gradient, integer labels",
        "gradient",
        _grad(optax.softmax_cross_entropy_with_integer_labels),
    ),
    Measure("jax.nn", "loss, integer labels", "loss", lambda z, y, s: _jax_nn_loss(z, y)),
    Measure("jax.nn", "log_softmax", "log_softmax", lambda z, y, s: jax.nn.log_softmax(z)),
    Measure("jax.nn", "softmax", "softmax", lambda z, y, s: jax.nn.softmax(z)),
    Measure("jax.nn", "gradient, integer labels", "gradient", _grad(_jax_nn_loss)),
)
# The linear head: the same rows fed through jsm.linear_cross_entropy as x = identity rows and
# w = the logits, so that x @ w is exact (see evaluate_linear). "none" runs its two-pass
# schedule, "sum" its one-pass one.
LINEAR_MEASURES: tuple[Measure, ...] = (
    Measure("jsoftmax", "loss, integer labels (linear head)", "loss", None),
    Measure("jsoftmax", "gradient, integer labels (linear head, two-pass)", "gradient", None),
    Measure("jsoftmax", "gradient, integer labels (linear head, one-pass)", "gradient", None),
)
LIBRARIES = ("jsoftmax", "optax", "jax.nn")
TABLE_ROWS = (  # the README table: one line per quantity, one column per library
    "loss, integer labels",
    "loss, integer labels (fused)",
    "loss, soft labels",
    "loss, soft labels (fused)",
    "log_softmax",
    "softmax",
    "gradient, integer labels",
    "gradient, integer labels (jax.grad of cross_entropy)",
    "loss, integer labels (linear head)",
    "gradient, integer labels (linear head, two-pass)",
    "gradient, integer labels (linear head, one-pass)",
)


# ------------------------------------------------------------------------------------ the error


def ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``|got - exact| / np.spacing(float32(|exact|))``; exact 0 and ±inf must be hit exactly.

    NaN outputs, and outputs that are not finite where the exact value is, count as ``inf``.
    """
    got = np.asarray(got, np.float64)
    exact = np.asarray(exact, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        spacing = np.spacing(np.abs(exact).astype(F32)).astype(np.float64)
        err = np.abs(got - exact) / spacing
    special = (exact == 0) | np.isinf(exact)
    err = np.where(special, np.where(got == exact, 0.0, np.inf), err)
    return np.where(np.isnan(err), np.inf, err)


def classify(got: np.ndarray, exact: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks: correctly rounded, flushed to zero, and digits lost."""
    got = np.asarray(got, np.float64)
    exact = np.asarray(exact, np.float64)
    rounded = exact.astype(F32).astype(np.float64)
    normal = np.isfinite(exact) & (np.abs(exact) >= TINY)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(got - exact) / np.abs(exact)
    return {
        "exact": (got == rounded) | (np.isnan(got) & np.isnan(exact)),
        # An exact subnormal result returned as 0: the platform's flush-to-zero, not the formula.
        "flushed": (got == 0) & (rounded != 0) & (np.abs(exact) < TINY),
        "digits_lost": normal & ~(rel <= LOST_DIGITS_RTOL),
        "zeroed": normal & (got == 0),
    }


# -------------------------------------------------------------------------------- the measuring


def _collect(store: dict, got, exact: list, idx: list[int]) -> None:
    """Appends one batch of rows (``got`` and its ``exact`` values) to a measure's store."""
    got = np.asarray(got, np.float32).reshape(len(idx), -1)
    cols = got.shape[1]
    store["got"].append(got.ravel())
    store["exact"].append(np.stack(exact).ravel())
    store["row"].append(np.repeat(np.asarray(idx), cols))
    store["col"].append(np.tile(np.arange(cols), len(idx)))


def evaluate(domain: list[Row], refs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Runs every measure on the domain (grouped by class count) and collects the errors."""
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(domain):
        groups.setdefault(row.z.size, []).append(i)
    # One program per class count computes every measure: one compilation per shape.
    run_all = jax.jit(lambda z, y, s: tuple(m.fn(z, y, s) for m in MEASURES))
    collected: dict[Measure, dict[str, list[np.ndarray]]] = {
        m: {"got": [], "exact": [], "row": [], "col": []} for m in MEASURES
    }
    for _, idx in tqdm(sorted(groups.items()), desc="jax", unit="shape", leave=False):
        z = jnp.asarray(np.stack([domain[i].z for i in idx]))
        y = jnp.asarray(np.array([domain[i].label for i in idx], np.int32))
        s = jnp.asarray(np.stack([domain[i].soft for i in idx]))
        outputs = jax.block_until_ready(run_all(z, y, s))
        for m, got in zip(MEASURES, outputs, strict=True):
            _collect(collected[m], got, [refs[i][m.quantity] for i in idx], idx)
    return {m.library + " | " + m.name: _summarize(m, domain, collected[m]) for m in MEASURES}


def _linear_head(z: np.ndarray, labels: np.ndarray):
    """Per-row loss (``"none"``) and the logits' gradient under ``"none"`` and ``"sum"`` of rows
    ``z`` [n, C] fed through ``linear_cross_entropy`` as ``x = I``, ``w = z`` (exact logits).

    ``0 * -inf`` is NaN, so a row with ``-inf`` logits goes alone, its ``-inf`` entries in the
    bias; the other rows go together.
    """
    n, c = z.shape
    finite = [i for i in range(n) if np.all(np.isfinite(z[i]))]
    batches = ([finite] if finite else []) + [[i] for i in range(n) if i not in finite]
    loss, grad_none, grad_sum = np.zeros(n), np.zeros((n, c)), np.zeros((n, c))

    def run(x, w, y, bias):
        def total(w, reduction):
            out = jsm.linear_cross_entropy(x, w, y, bias=bias, reduction=reduction)
            return jnp.sum(out), out

        (_, rows), g_none = jax.value_and_grad(total, has_aux=True)(w, "none")
        g_sum = jax.grad(lambda w: total(w, "sum")[0])(w)
        return rows, g_none, g_sum

    run = jax.jit(run)
    for rows in batches:
        zb = z[rows]
        bias = None
        if len(rows) == 1 and not np.all(np.isfinite(zb)):
            bias = jnp.asarray(np.where(np.isneginf(zb[0]), -np.inf, 0.0), jnp.float32)
        w = jnp.asarray(np.where(np.isneginf(zb), 0.0, zb), jnp.float32)
        x = jnp.eye(len(rows), dtype=jnp.float32)
        out = jax.block_until_ready(run(x, w, jnp.asarray(labels[rows], jnp.int32), bias))
        loss[rows], grad_none[rows], grad_sum[rows] = (np.asarray(a) for a in out)
    return loss, grad_none, grad_sum


def evaluate_linear(domain: list[Row], refs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``LINEAR_MEASURES`` on the domain, grouped by class count (see ``_linear_head``)."""
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(domain):
        groups.setdefault(row.z.size, []).append(i)
    collected = {m: {"got": [], "exact": [], "row": [], "col": []} for m in LINEAR_MEASURES}
    for _, idx in tqdm(sorted(groups.items()), desc="linear head", unit="shape", leave=False):
        z = np.stack([domain[i].z for i in idx])
        labels = np.array([domain[i].label for i in idx], np.int32)
        outputs = _linear_head(z, labels)
        for m, got in zip(LINEAR_MEASURES, outputs, strict=True):
            _collect(collected[m], got, [refs[i][m.quantity] for i in idx], idx)
    return {
        m.library + " | " + m.name: _summarize(m, domain, collected[m]) for m in LINEAR_MEASURES
    }


def _case(domain: list[Row], row: int, col: int, exact: float, got: float, ulp: float) -> dict:
    """One output, with what it takes to reproduce it (the logits themselves when C <= 16)."""
    r = domain[row]
    return {
        "ulp": ulp,
        "row": row,
        "family": r.family,
        "classes": int(r.z.size),
        "label": r.label,
        "index": col,
        "exact": exact,
        "got": got,
        "logits": r.z.tolist() if r.z.size <= 16 else None,
        "max_logit": float(np.max(r.z)),
    }


def _summarize(m: Measure, domain: list[Row], store: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    got = np.concatenate(store["got"])
    exact = np.concatenate(store["exact"])
    rows = np.concatenate(store["row"])
    cols = np.concatenate(store["col"])
    err = ulp_error(got, exact)
    masks = classify(got, exact)
    counted = ~masks["flushed"]
    err_counted = np.where(counted, err, 0.0)
    target = TARGETS[m.quantity]
    family_of = np.array([domain[r].family for r in rows])
    by_family = {}
    for f in sorted(set(family_of.tolist())):
        at = int(np.argmax(np.where(family_of == f, err_counted, -1.0)))
        by_family[f] = _case(
            domain,
            int(rows[at]),
            int(cols[at]),
            float(exact[at]),
            float(got[at]),
            float(err_counted[at]),
        )
    worst = max(by_family.values(), key=lambda case: case["ulp"])
    per_row = m.quantity in ("loss", "soft loss")
    return {
        "library": m.library,
        "function": m.name,
        "quantity": m.quantity,
        "target_ulp": target,
        "held_to_target": m.held_to_target,
        "outputs": int(got.size),
        "worst_ulp": worst["ulp"],
        "median_ulp": float(np.quantile(err[counted], 0.5, method="inverted_cdf")),
        "p99_ulp": float(np.quantile(err[counted], 0.99, method="inverted_cdf")),
        "exactly_rounded": int(np.sum(masks["exact"])),
        "over_target": int(np.sum(counted & ~(err <= target))),
        "flushed_to_zero": int(np.sum(masks["flushed"])),
        "digits_lost": int(np.sum(masks["digits_lost"])),
        "zero_for_normal": int(np.sum(masks["zeroed"])),
        "worst_ulp_by_family": {f: case["ulp"] for f, case in by_family.items()},
        "worst_case": worst,
        "worst_case_by_family": by_family,
        "scatter": {  # per-row quantities only, for the plot
            "exact": exact.tolist() if per_row else None,
            "ulp": err.tolist() if per_row else None,
        },
    }


# ------------------------------------------------------------------------------ report and plot


def fmt_ulp(x: float) -> str:
    if not np.isfinite(x):
        return "inf"
    if x < 100:
        return f"{x:.1f}"
    return f"{x:.2g}" if x < 1e4 else f"{x:.1e}"


def markdown_tables(results: dict[str, dict[str, Any]]) -> str:
    """Worst (median) ulps, and outputs with fewer than 3 correct digits, per library."""
    by_name = {(r["library"], r["function"]): r for r in results.values()}
    head = "| quantity (float32) | target | " + " | ".join(LIBRARIES) + " |"
    rule = "|---|---:|" + "---:|" * len(LIBRARIES)
    lines = ["Worst error in ulps (median in parentheses):", "", head, rule]
    lost = ["Outputs with fewer than 3 correct digits (of all outputs measured):", "", head, rule]
    for name in TABLE_ROWS:
        quantity = next(r["quantity"] for r in results.values() if r["function"] == name)
        held = by_name.get(("jsoftmax", name), {}).get("held_to_target", True)
        target = f"{TARGETS[quantity]:.0f}" if held else "—"
        cells, lost_cells = [], []
        for lib in LIBRARIES:
            r = by_name.get((lib, name))
            if r is None:
                cells.append("—")
                lost_cells.append("—")
                continue
            cells.append(f"{fmt_ulp(r['worst_ulp'])} ({fmt_ulp(r['median_ulp'])})")
            lost_cells.append(f"{r['digits_lost']} / {r['outputs']}")
        lines.append(f"| {name} | {target} | " + " | ".join(cells) + " |")
        lost.append(f"| {name} | {target} | " + " | ".join(lost_cells) + " |")
    families = sorted({f for r in results.values() for f in r["worst_ulp_by_family"]})
    fam = [
        "jsoftmax, worst error in ulps by family of rows:",
        "",
        "| quantity | " + " | ".join(families) + " |",
        "|---|" + "---:|" * len(families),
    ]
    for name in TABLE_ROWS:
        r = by_name[("jsoftmax", name)]
        fam.append(
            f"| {name} | "
            + " | ".join(fmt_ulp(r["worst_ulp_by_family"][f]) for f in families)
            + " |"
        )
    note = (
        "jsoftmax's loss rows are `cross_entropy` and, marked fused, `fused_cross_entropy`; its "
        "gradient is the custom VJP of `fused_cross_entropy`. optax: "
        "`softmax_cross_entropy_with_integer_labels`, `softmax_cross_entropy` (soft labels) and "
        "`jax.grad` of the former. jax.nn: `log_softmax`, `softmax`, the loss "
        "`-log_softmax(z)[y]` and its `jax.grad`. inf: a NaN or infinite output where the "
        "exact value is finite."
    )
    return "\n".join(lines + ["", note, ""] + lost + [""] + fam)


def plot(path: Path, results: dict[str, dict[str, Any]]) -> Path:
    plt = _common.pyplot()
    fig, (ax_bar, ax_sc) = plt.subplots(1, 2, figsize=(14, 5.5), width_ratios=(1.25, 1))
    colors = {"jsoftmax": "tab:blue", "optax": "tab:orange", "jax.nn": "tab:green"}
    by_name = {(r["library"], r["function"]): r for r in results.values()}
    width = 0.27
    floor = 0.1  # a worst error of 0 ulp is drawn at this height
    for j, lib in enumerate(LIBRARIES):
        xs, hs = [], []
        for i, name in enumerate(TABLE_ROWS):
            r = by_name.get((lib, name))
            if r is not None:
                x = i + (j - 1) * width
                xs.append(x)
                hs.append(min(max(r["worst_ulp"], floor), 3e9))
                if not np.isfinite(r["worst_ulp"]):  # a NaN output
                    ax_bar.text(x, 3e9, "NaN", ha="center", va="bottom", fontsize=8)
        ax_bar.bar(xs, hs, width, label=lib, color=colors[lib])
    for i, name in enumerate(TABLE_ROWS):
        r = by_name[("jsoftmax", name)]
        if r["held_to_target"]:
            ax_bar.hlines(
                r["target_ulp"],
                i - 1.5 * width,
                i + 1.5 * width,
                colors="k",
                linestyles="--",
                linewidth=1,
            )
    ax_bar.set_yscale("log")
    ax_bar.set_ylim(floor, 1e10)
    ax_bar.set_xticks(range(len(TABLE_ROWS)))
    short = [
        n.replace(", integer labels", ",\nint")
        .replace(", soft labels", ",\nsoft")
        .replace(" (jax.grad of cross_entropy)", "\n(jax.grad)")
        .replace(" (linear head", "\n(linear")
        for n in TABLE_ROWS
    ]
    ax_bar.set_xticklabels(short, fontsize=8)
    ax_bar.set_ylabel("worst error [float32 ulps]")
    ax_bar.set_title("Worst error on the adversarial domain (dashed: target)")
    ax_bar.legend(loc="upper left")

    markers = {"jsoftmax": "o", "optax": "s", "jax.nn": "^"}
    names = {
        "jsoftmax": "loss, integer labels (fused)",
        "optax": "loss, integer labels",
        "jax.nn": "loss, integer labels",
    }
    for lib in LIBRARIES:
        sc = by_name[(lib, names[lib])]["scatter"]
        exact, err = np.asarray(sc["exact"]), np.asarray(sc["ulp"])
        keep = exact > 0
        ax_sc.scatter(
            exact[keep],
            np.clip(err[keep], floor, 1e12),
            s=9,
            alpha=0.5,
            marker=markers[lib],
            color=colors[lib],
            label=f"{lib}: {names[lib]}",
        )
    ax_sc.axhline(TARGETS["loss"], color="k", linestyle="--", linewidth=1)
    ax_sc.set_xscale("log")
    ax_sc.set_yscale("log")
    ax_sc.set_xlabel("exact loss (small = confident and right)")
    ax_sc.set_ylabel("error [float32 ulps]")
    ax_sc.set_title("Loss error against the exact loss")
    ax_sc.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncol=2)
    return _common.save_figure(fig, path)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Accuracy in float32 ulps against a 50-digit mpmath reference.",
    )
    parser.add_argument("--quick", action="store_true", help="a small domain (a few seconds)")
    parser.add_argument("--out", default=None, help="results folder (default experiments/results)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the domain")
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help="random rows added to the adversarial grid (default 1200, quick 40)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    out = _common.results_dir(args.out)
    n_random = args.rows if args.rows is not None else (40 if args.quick else 1200)
    domain = build_domain(args.seed, n_random, args.quick)
    refs = [reference(row) for row in tqdm(domain, desc="mpmath", unit="row", leave=False)]
    results = evaluate(domain, refs)
    results.update(evaluate_linear(domain, refs))
    families: dict[str, int] = {}
    for row in domain:
        families[row.family] = families.get(row.family, 0) + 1
    misses = [  # the worst output of each family of rows that misses the target
        {"function": r["function"], "target_ulp": r["target_ulp"], **case}
        for r in results.values()
        if r["library"] == "jsoftmax" and r["held_to_target"]
        for case in r["worst_case_by_family"].values()
        if not case["ulp"] <= r["target_ulp"]
    ]
    table = markdown_tables(results)
    summary = {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "seed": args.seed,
        "quick": args.quick,
        "reference_digits": DPS,
        "rows": len(domain),
        "outputs_per_elementwise_function": int(sum(r.z.size for r in domain)),
        "rows_per_family": families,
        "class_counts": sorted({int(r.z.size) for r in domain}),
        "lost_digits_rtol": LOST_DIGITS_RTOL,
        "jsoftmax_meets_targets": not misses,
        "jsoftmax_misses": misses,
        "results": results,
        "markdown": table,
    }
    png = plot(out / "accuracy.png", results)
    for r in results.values():  # the per-row points are drawn, not stored
        del r["scatter"]
    summary["png"] = str(png)
    summary["wall_seconds"] = time.perf_counter() - start
    json_path = _common.write_json(out / "accuracy.json", summary)
    print(
        f"{len(domain)} rows, {summary['outputs_per_elementwise_function']} entries, "
        f"classes {summary['class_counts']}, reference: mpmath at {DPS} digits"
    )
    print()
    print(table)
    print()
    flushed = {k: r["flushed_to_zero"] for k, r in results.items() if r["flushed_to_zero"]}
    if flushed:
        print(
            "exact subnormal outputs returned as 0 (flush-to-zero, not counted): "
            f"{min(flushed.values())} to {max(flushed.values())} per function, every library"
        )
    for w in misses:
        logits = f", logits {w['logits']}" if w["logits"] is not None else ""
        print(
            f"MISS jsoftmax {w['function']}: {fmt_ulp(w['ulp'])} ulp > {w['target_ulp']:.0f} "
            f"at row {w['row']} ({w['family']}, C={w['classes']}, label {w['label']}, "
            f"index {w['index']}): exact {w['exact']!r}, got {w['got']!r}{logits}"
        )
    print(f"jsoftmax within target everywhere: {not misses}")
    print(f"wrote {json_path}, {png} in {summary['wall_seconds']:.1f} s")
    return summary


if __name__ == "__main__":
    main()
