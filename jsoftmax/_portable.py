r"""The portable formulation: the plain statement of the math, for XLA's GPU and TPU compilers.

Every op in this package has this formulation, used in programs lowered for any platform but
CPU, and a CPU one tuned for XLA:CPU's fusion rules (:mod:`jsoftmax._numerics`). Both compute
the same numbers to rounding. :func:`jsoftmax._platform.by_platform` picks one when the program
is lowered. This module is where a reader learns the math; the CPU module is its optimization.

Notation, per row of logits :math:`z` (class axis last unless ``axis`` says otherwise):
:math:`m = \max_j z_j`, :math:`d = z - m \le 0`, :math:`e = e^{d}`, :math:`S = \sum_j e_j`.

Row statistics (the normalizers, float labels). With :math:`t` the number of entries at the max,

.. math::

   T = S - 1 = (t - 1) + \sum_{j:\, d_j < 0} e^{d_j}, \qquad
   \log\textstyle\sum_j e^{z_j} = m + \operatorname{log1p}(T).

No ``1 + tiny`` is rounded before the log: a confident row keeps every digit of its small
:math:`T`. The two sums (the count and the sum below the max) read the same row; XLA fuses them
into one pass, so the statistics cost two reads of the logits (the max, then the sums), as
``jax.nn.logsumexp`` does.

Integer labels (the fused loss). With :math:`y` the label and
:math:`Q = \sum_{j \ne y} e^{d_j}` (the label left out by a plain select on the class index),

.. math::

   T = \operatorname{expm1}(d_y) + Q, \qquad
   \ell = \operatorname{log1p}(T) - d_y, \qquad
   \frac{\partial \ell}{\partial z_j} = \begin{cases}
      (\operatorname{expm1}(d_y) - T) / S = -Q/S & j = y \\ e_j / S & j \ne y. \end{cases}

When the label is at the max, :math:`d_y = 0` and :math:`T = Q` exactly, however small; the
label's gradient :math:`a_y - 1 = -Q/S` is never formed as ``a_y - 1``, which rounds to 0 for a
confident row. Both terms of the loss are non-negative, so it has no cancellation either. The
forward pass reads the logits twice (the max; then ``Q`` and, with label smoothing, the count
and the sum of the finite logits, in one fused pass) and the label's logit once per row; the
backward pass reads them once and writes the gradient, one select per entry. Between the passes
only per-row statistics are kept, never a ``[rows, classes]`` array; 16-bit logits are widened
inside each pass, never written out in float32.

Measured with XLA's own TPU compiler (``experiments/bench_accelerators.py``, a v5e, compiled
without one): ``value_and_grad`` of the fused loss at ``[8192, 32768]`` moves 4134 MiB of HBM
in float32 (optax: 4133) and 2069 MiB in bfloat16 (optax: 2069), with no temporary array;
``log_softmax`` and ``logsumexp`` move what ``jax.nn``'s do.

With ``axis_name`` the class axis is split over a mapped mesh axis: the max is a ``pmax``, every
sum a ``psum`` of per-shard sums, and the label's logit is read on the shard that owns it (the
others add 0), as in :func:`jsoftmax._targets.lookup`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from . import _numerics as nm
from . import _targets as tg


def row_stats(z: jax.Array, axis: int, axis_name=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(m, S, T)`` of each row of ``z`` (already masked), each with ``axis`` kept as size 1.

    ``m`` is the row max (0 for an empty row); ``S = sum exp(z - m)`` and ``T = S - 1`` are 0
    for an empty row. A NaN or ``+inf`` entry makes ``S`` and ``T`` NaN.
    """
    m_raw = nm.raw_max(z, axis, axis_name)
    m = nm.finite_shift(m_raw)
    d = nm.shifted(z, m)  # exactly 0 at the max entries; NaN for NaN or +inf entries
    top = d == 0
    count = nm.psum(jnp.sum(top.astype(z.dtype), axis, keepdims=True), axis_name)  # t
    # The max entries are left out by a select; exp(d) carries a NaN.
    below = jnp.where(top, jnp.zeros((), z.dtype), jnp.exp(d))
    t_minus_one = (count - 1) + nm.psum(jnp.sum(below, axis, keepdims=True), axis_name)
    return _finish(m_raw, m, 1 + t_minus_one, t_minus_one)


def _finish(m_raw, m, total, t_minus_one):
    """Empty rows get ``S = T = 0`` (and ``m = 0``): nothing to divide by, no ``log(0)``."""
    nonempty = nm._nonempty(m_raw, total)
    zero = jnp.zeros((), total.dtype)
    return m, jnp.where(nonempty, total, zero), jnp.where(nonempty, t_minus_one, zero)


def _is_label(z: jax.Array, local: jax.Array) -> jax.Array:
    """``j == label`` for every entry (class axis last); ``local`` is ``[...]``, this shard's
    index of the label, and one outside ``[0, C)`` selects nothing."""
    j = lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    return j == local.astype(jnp.int32)[..., None]


def _safe_lse(stats: nm.RowStats) -> jax.Array:
    return jnp.where(stats.nonempty, stats.lse, jnp.zeros((), stats.T.dtype))


def int_forward(logits: jax.Array, labels: jax.Array, mask, opts: tg.Options):
    """The fused loss's forward pass for integer labels (class axis last).

    Returns ``(loss, stats, (ints, K))``: per-example losses ``[...]``, the row statistics
    ``m, S, T`` (``[..., 1]``), the sorted labels and, with label smoothing, the count ``K`` of
    included finite classes (else None): the residuals the backward pass needs besides the
    inputs.
    """
    axis_name = opts.axis_name
    eps = opts.label_smoothing
    z = nm.compute_logits(logits, mask)
    ints = tg.int_labels(labels, mask, opts, z.shape[-1])
    local = ints.safe - tg.class_offset(z.shape[-1], axis_name)
    m_raw = nm.raw_max(z, -1, axis_name)
    m = nm.finite_shift(m_raw)
    d = nm.shifted(z, m)
    zero = jnp.zeros((), z.dtype)
    # Q: the sum without the label, left out by a select on the class index.
    q = nm.psum(
        jnp.sum(jnp.where(_is_label(z, local), zero, jnp.exp(d)), -1, keepdims=True), axis_name
    )
    # The label's logit, read from the logits as given (a read of a widened copy would make
    # XLA write that copy out), then masked as z is: -inf on an excluded class, so that a NaN
    # there does not make a row with nothing included count as non-empty.
    z_y = tg.lookup(logits, ints.safe, axis_name).astype(z.dtype)
    if mask is not None:
        z_y = nm.mask_logits(z_y, tg.lookup(mask.astype(jnp.int32), ints.safe, axis_name) > 0)
    d_y = nm.shifted(z_y, m)
    m, total, t_minus_one = _finish(m_raw, m, jnp.exp(d_y) + q, jnp.expm1(d_y) + q)
    stats = nm.RowStats(m, total, t_minus_one)
    # -log a_y = log1p(T) - d_y: two non-negative terms.
    ce = stats.log_z - (1 - eps) * d_y
    k = None
    if eps:
        # The smoothing part of the target, eps/K on each of the K included finite classes:
        # eps (log1p(T) - mean of the finite d); K and the sum come from the pass of Q.
        finite = jnp.isfinite(z)
        k = jnp.maximum(nm.psum(jnp.sum(finite.astype(z.dtype), -1, keepdims=True), axis_name), 1)
        sum_fd = nm.psum(jnp.sum(jnp.where(finite, d, zero), -1, keepdims=True), axis_name)
        ce = ce - (eps / k) * sum_fd
    if opts.z_loss:
        # (sqrt(c)·lse)², not c·lse²: no overflow of lse² alone, no 0 · inf for a tiny c.
        ce = ce + (math.sqrt(opts.z_loss) * _safe_lse(stats)) ** 2
    return tg.finish_rows(ce, stats.nonempty, ints), stats, (ints, k)


def int_backward(z: jax.Array, mask, stats: nm.RowStats, row, g: jax.Array, opts: tg.Options):
    """The fused loss's gradient with respect to ``z`` for integer labels: one pass.

    .. math::

       \\frac{\\partial \\ell}{\\partial z_j} = g\\Big(\\big([j = y]\\,(\\operatorname{expm1}(d_j)
       - T) + [j \\ne y]\\, e_j + 2c\\,\\mathrm{lse}\\, e_j\\big) / S
       + \\varepsilon\\,\\big([j = y] - f_j / K\\big)\\Big)

    ``g`` is the cotangent per example, ``[..., 1]``; ``row`` the ``(ints, K)`` of
    :func:`int_forward`. Ignored examples and rows with nothing included get 0, a bad label NaN
    in its row (excluded classes keep 0).
    """
    ints, k = row
    eps = opts.label_smoothing
    zero = jnp.zeros((), z.dtype)
    keep = stats.nonempty & ~ints.ignored
    bad = ints.bad & stats.nonempty
    w = jnp.where(keep, g, zero)
    w = jnp.where(bad, jnp.nan, w)  # a bad label makes its whole row NaN
    per_s = w / stats.partition
    d = nm.shifted(z, stats.m)
    e = jnp.exp(d)
    is_label = _is_label(z, ints.safe - tg.class_offset(z.shape[-1], opts.axis_name))
    # a_j for j != y; a_y - 1 = (expm1(d_y) - T) / S for the label, never 1 - 1.
    grad = jnp.where(is_label, jnp.expm1(d) - stats.T, e)
    if opts.z_loss:
        grad = grad + (2 * opts.z_loss * _safe_lse(stats)) * e
    grad = grad * per_s
    if eps:
        # Finite logits, read off d (finite z: d > -inf; NaN: neither): not spelled as the
        # forward pass's isfinite(z), which XLA would then share and keep as a
        # [rows, classes] array between the passes.
        f = (d > -jnp.inf).astype(z.dtype)
        grad = grad + (eps * w) * (is_label.astype(z.dtype) - f / k)
    if mask is not None:  # excluded classes do not exist: gradient 0 even in a NaN row
        grad = jnp.where(mask, grad, zero)
    return grad
