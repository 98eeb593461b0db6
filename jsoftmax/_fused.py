r"""The fused cross-entropy: one ``jax.custom_vjp`` with a hand-written backward pass.

Forward, per example (class axis last, :math:`d = z - m`, row statistics :math:`S, T` of
:mod:`jsoftmax._numerics`):

.. math::

   \ell = \Big(\sum_i \tilde y_i\Big)\operatorname{log1p}(T) - \sum_i \tilde y_i d_i
          + c\,\mathrm{lse}^2 .

Every term is non-negative (:math:`\operatorname{log1p}(T) \ge 0`, :math:`d_i \le 0`), so the sum
has no cancellation: the loss keeps its relative accuracy down to :math:`10^{-30}`.

Backward, for a cotangent :math:`g` per example:

.. math::

   \frac{\partial \ell}{\partial z_i} = g\Big(a_i \big(\textstyle\sum_j \tilde y_j
      + 2 c\, \mathrm{lse}\big) - \tilde y_i\Big), \qquad
   \frac{\partial \ell}{\partial y_i} = -g\,(1 - \varepsilon)\, w_i \log a_i .

For integer labels :math:`\sum_j \tilde y_j = 1`, and the label's own component
:math:`a_y - 1` is computed as :math:`((e^{d_y} - 1) - T)/(1 + T)`, never as ``a_y - 1``, which
would round to ``1 - 1 = 0`` for a confident row.

Residuals: the logits as given (the caller holds them already), the integer labels or target
distribution (likewise), the mask, and O(rows) statistics: ``m``, ``S``, ``T`` (and
``K``/``sum(y)`` where smoothing or soft labels need them). The backward rule computes
``exp(z - m)`` from these, so no ``[rows, classes]`` float32 array is kept between the passes,
whatever the logits' dtype (when both run in one program, XLA may compute it once, in the
gradient's own buffer: below).

Passes over the logits (XLA:CPU, ``value_and_grad`` of the mean, integer labels, float32, a
multiple of 128 classes; read from ``jax.jit(f).lower(...).compile().as_text()``): the forward
rule spells ``exp(z - m)`` over ``[rows, classes]`` exactly as the backward does
(``_numerics._block_sums``), so XLA computes it once. One fusion reads the logits for the row
max; one writes ``exp(z - m)`` into the gradient's buffer (a fresh array, bound by page faults
on CPU, which the ``exp`` adds little to); the block sums of ``_numerics._sum_without_label``
read that; the label's logit and 128-class block are gathered per row; and the gradient is that
buffer times a per-row scale, in place, with the label entries set afterwards by a scatter of
one value per row (a compare and select on every entry cost 5-10% of the pass). This is the
structure XLA gives optax's loss; sharing the exponentials took 3-11% off against recomputing
them in the backward pass. No ``[rows, classes]`` temporary besides the gradient
(``memory_analysis``). The loss alone, with no backward pass, does not share (that spelling is
3x slower without one): it reads the logits twice and writes nothing of their size. Nor do label
smoothing, a class count with a ragged last block, or 16-bit logits (float32 exponentials cannot
live in a 16-bit gradient): XLA kept the shared exponentials in a temporary of their own there.
For 16-bit logits the row max reads them in their own dtype, and XLA writes one float32 copy of
them for the block sums (see :mod:`jsoftmax._numerics`).

That is XLA:CPU's program. Programs lowered for GPU or TPU carry the plain formulation of
:mod:`jsoftmax._portable` instead (integer labels: the forward and backward rules; float labels:
the row statistics), chosen by :func:`jsoftmax._platform.by_platform` when the program is
lowered. Both return the same residuals, so one backward rule serves either forward pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _numerics as nm
from . import _portable as pt
from . import _sharding as sh
from . import _targets as tg
from ._platform import by_platform


def fused_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    z_loss: float = 0.0,
    reduction: str = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with a hand-written backward pass (``jax.custom_vjp``).

    Computes the same function as :func:`jsoftmax.cross_entropy`, with the same arguments, but
    differentiates with the closed form :math:`a\sum\tilde y - \tilde y` (:math:`a - y` for a
    one-hot target) instead of autodiff, and keeps only the logits and per-row statistics
    between the passes.

    .. math::

       \frac{\partial \ell}{\partial z} = g\,\big(a \textstyle\sum_j \tilde y_j - \tilde y
       + 2c\,\mathrm{lse}\,a\big), \qquad
       \frac{\partial \ell}{\partial y} = -g\,(1 - \varepsilon)\,\log a

    Reverse-over-reverse works (``jax.jacrev(jax.grad(f))`` gives
    :math:`\sum\tilde y\,(\mathrm{diag}(a) - a a^\top)`); forward mode does not, as for any
    ``custom_vjp``: use :func:`jsoftmax.cross_entropy` for ``jvp``/``jacfwd``.

    Args:
      logits: unnormalized log-probabilities, shape ``[..., num_classes, ...]`` (class axis
        ``axis``); 16-bit inputs are computed in float32 and get a gradient of their own dtype.
      labels: integer class ids with the shape of ``logits`` without the class axis (no
        gradient: a float0 cotangent), or a float target distribution with the shape of
        ``logits`` (differentiable, as in distillation).
      axis: the class axis, or a tuple of class axes: several axes are one flattened class
        axis (in the order given, as optax flattens them; integer labels index it), and None is
        all axes.
      where: optional boolean mask broadcastable to ``logits``: the classes that take part.
      label_smoothing: :math:`\varepsilon \in [0, 1)`; the target becomes
        :math:`(1-\varepsilon)y + \varepsilon/K` on the K included classes with finite logits.
      ignore_index: integer labels equal to it give loss 0 and gradient 0 and are left out of
        the mean.
      z_loss: :math:`c \ge 0`: adds :math:`c\,\mathrm{logsumexp}(z)^2` per example.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      axis_name: inside ``jax.shard_map``, the mesh axis over which the class axis is split
        (labels stay global class ids).

    Returns:
      ``"none"``: per-example losses, the shape of ``logits`` without the class axis; otherwise
      a scalar; float32 for 16-bit logits.

    Examples:
      >>> import jax, jax.numpy as jnp, jsoftmax as jsm
      >>> logits = jnp.array([4.0, -4.0, 3.0])
      >>> loss, grad = jax.value_and_grad(jsm.fused_cross_entropy)(logits, jnp.array(2))
      >>> print(f"{float(loss):.7f}", grad)
      1.3135068 [ 7.3087937e-01  2.4518272e-04 -7.3112452e-01]
      >>> g = jax.grad(jsm.fused_cross_entropy)(jnp.array([20.0, 0.0, 0.0]), jnp.array(0))
      >>> print(f"{float(g[0]):.4e}")
      -4.1223e-09
    """
    call = tg.parse(
        logits,
        labels,
        axis=axis,
        where=where,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        z_loss=z_loss,
        reduction=reduction,
        axis_name=axis_name,
    )
    if sh.class_mesh_axes(call) is not None:  # class axis split over explicit mesh axes
        return sh.vocab_parallel(fused_cross_entropy, call)
    loss = _rows(call.logits, call.labels, call.mask, call.options)
    ignored = None
    if call.options.kind == "int" and call.options.ignore_index is not None:
        ignored = call.labels == call.options.ignore_index
    return tg.reduce(loss, call, ignored)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rows(logits, labels, mask, opts: tg.Options):
    """Per-example loss, class axis last."""
    return _forward(logits, labels, mask, opts, shared_exp=False)[0]


def _rows_fwd(logits, labels, mask, opts: tg.Options):
    # Differentiated: on CPU the block sums spell exp(z - m) as _rows_bwd does, so that XLA
    # computes it once for both passes, in the gradient's buffer (see _numerics._block_sums);
    # alone (_rows), they do not. Integer labels without smoothing and 32/64-bit logits only:
    # float32 exponentials of 16-bit logits cannot live in their gradient's buffer, and with
    # smoothing or soft labels XLA kept them as a [rows, classes] temporary of their own.
    loss, stats, row = _forward(logits, labels, mask, opts, shared_exp=True)
    # Saved: the logits/labels/mask the caller already holds, and O(rows) statistics.
    return loss, (logits, labels, mask, stats, row)


def _forward(logits, labels, mask, opts: tg.Options, shared_exp: bool):
    """``(loss, stats, row)``: per-example losses, the row statistics and the per-row values
    the backward pass needs (``(ints, K)`` for integer labels, ``sum(y)`` for float ones).

    Integer labels have two formulations, picked when the program is lowered: XLA:CPU's tuned
    one below, and the plain one of :mod:`jsoftmax._portable` everywhere else; both return the
    same residuals. Float labels have one, whose row statistics switch inside
    :mod:`jsoftmax._numerics`.
    """
    if opts.kind == "int":
        return by_platform(
            functools.partial(_int_forward_cpu, opts=opts, shared_exp=shared_exp),
            functools.partial(pt.int_forward, opts=opts),
            logits,
            labels,
            mask,
        )
    return _float_forward(logits, labels, mask, opts)


def _int_forward_cpu(logits, labels, mask, opts: tg.Options, shared_exp: bool):
    z = nm.compute_logits(logits, mask)
    narrow = nm.narrow_dtype(logits.dtype)
    eps = opts.label_smoothing
    ints = tg.int_labels(labels, mask, opts, z.shape[-1])
    # Gather from z, not from d: a gather from d would make XLA materialize d.
    z_y = tg.lookup(z, ints.safe, opts.axis_name)
    offset = tg.class_offset(z.shape[-1], opts.axis_name)
    stats = nm.label_row_stats(
        z,
        z_y,
        ints.safe[..., None],
        offset,
        opts.axis_name,
        narrow,
        shared_exp and narrow is None and not eps,
    )
    d_y = nm.shifted(z_y, stats.m)
    # -log a_y = log1p(T) - d_y: two non-negative terms.
    ce = stats.log_z - (1 - eps) * d_y if eps else stats.log_z - d_y
    k = None
    if eps:
        f, k = tg.smoothing_support(z, opts.axis_name)
        d = nm.shifted(z, stats.m)
        sum_fd = nm.psum(jnp.sum(jnp.where(f > 0, d, 0), -1, keepdims=True), opts.axis_name)
        ce = ce - (eps / k) * sum_fd
    if opts.z_loss:
        # (sqrt(c)·lse)², not c·lse²: no overflow of lse² alone, no 0 · inf for a tiny c.
        ce = ce + (math.sqrt(opts.z_loss) * _safe_lse(stats)) ** 2
    return tg.finish_rows(ce, stats.nonempty, ints), stats, (ints, k)


def _float_forward(logits, labels, mask, opts: tg.Options):
    z = nm.compute_logits(logits, mask)
    stats, d = nm.row_stats(z, -1, opts.axis_name, nm.narrow_dtype(logits.dtype))
    y = tg.dense_target(z, labels, mask, opts)
    sum_y = nm.psum(jnp.sum(y, -1, keepdims=True), opts.axis_name)
    # 0 * (-inf) = 0 for an unweighted -inf logit.
    yd = jnp.where(y == 0, jnp.zeros((), d.dtype), y * d)
    ce = sum_y * stats.log_z - nm.psum(jnp.sum(yd, -1, keepdims=True), opts.axis_name)
    if opts.z_loss:
        ce = ce + (math.sqrt(opts.z_loss) * _safe_lse(stats)) ** 2
    return tg.finish_rows(ce, stats.nonempty, None), stats, sum_y


def _safe_lse(stats: nm.RowStats) -> jax.Array:
    return jnp.where(stats.nonempty, stats.lse, jnp.zeros((), stats.T.dtype))


def _set_label_entries(grad: jax.Array, local: jax.Array, values: jax.Array) -> jax.Array:
    """``grad[..., local] = values`` row by row; ``local`` outside ``[0, C)`` leaves the row."""
    num = grad.shape[-1]
    index = jnp.where((local >= 0) & (local < num), local, num)  # num: dropped

    def one_row(row, i, value):
        return row.at[i].set(value, mode="drop")

    # A scatter with the rows as batch dimensions: under jit's automatic partitioning each
    # device writes its own rows, with no index crossing devices.
    flat = jax.vmap(one_row)(
        grad.reshape(-1, num), index.reshape(-1), values.reshape(-1).astype(grad.dtype)
    )
    return flat.reshape(grad.shape)


def _rows_bwd(opts: tg.Options, res, g):
    logits, labels, mask, stats, row = res
    if opts.kind == "int":
        grad = by_platform(
            functools.partial(_int_grad_cpu, opts=opts),
            functools.partial(_int_grad_portable, opts=opts),
            logits,
            mask,
            stats,
            row,
            g,
        )
        return grad.astype(logits.dtype), None, None
    z = nm.compute_logits(logits, mask)
    g = g[..., None].astype(z.dtype)
    zero = jnp.zeros((), z.dtype)
    eps = opts.label_smoothing
    lse_term = 2 * opts.z_loss * _safe_lse(stats) if opts.z_loss else zero
    sum_y = row
    w = jnp.where(stats.nonempty, g, zero)
    e = jnp.exp(nm.shifted(z, stats.m))
    y = tg.dense_target(z, labels, mask, opts)
    grad = e * ((sum_y + lse_term) * w / stats.partition) - y * w
    if mask is not None:  # excluded classes do not exist: gradient 0 even in a NaN row
        grad = jnp.where(mask, grad, zero)
    # d loss / d y_i = (1 - eps) w_i (-log a_i); a VJP is linear in g, so g = 0 gives 0.
    # 0 · log 0 = 0: a zero target on a -inf logit contributes nothing, not +inf.
    nll = stats.log_z - nm.shifted(z, stats.m)
    drop = (w == 0) | ((y == 0) & (nll == jnp.inf))
    if mask is not None:
        drop = drop | ~mask
    dlabels = jnp.where(drop, zero, (1 - eps) * w * nll).astype(labels.dtype)
    return grad.astype(logits.dtype), dlabels, None


def _int_grad_portable(logits, mask, stats, row, g, opts: tg.Options):
    z = nm.compute_logits(logits, mask)
    return pt.int_backward(z, mask, stats, row, g[..., None].astype(z.dtype), opts)


def _int_grad_cpu(logits, mask, stats, row, g, opts: tg.Options):
    z = nm.compute_logits(logits, mask)
    g = g[..., None].astype(z.dtype)
    zero = jnp.zeros((), z.dtype)
    partition = stats.partition
    eps = opts.label_smoothing
    lse_term = 2 * opts.z_loss * _safe_lse(stats) if opts.z_loss else zero
    ints, k = row
    keep = stats.nonempty & ~ints.ignored
    w = jnp.where(keep, g, zero)
    bad = ints.bad & stats.nonempty  # NaN everywhere in the row
    # exp(z - m) as the forward rule's block sums spell it (shared_exp): XLA computes it once,
    # in this gradient's buffer. Not exp(shifted(z, m)): the label entries are set below, and
    # another max entry coming out as exp(±1 ulp) is a rounding-level change.
    e = jnp.exp(z - stats.m)
    # a_i (1 + 2c lse) - eps f_i / K everywhere, as one multiply of exp(d) per entry; a bad
    # label's NaN rides on the per-row scale, not on a select per entry.
    scale = jnp.where(bad, jnp.nan, (1 + lse_term) * w / partition)
    grad = e * scale
    if eps:
        f = jnp.isfinite(z).astype(z.dtype)
        grad = grad - (eps * w / k) * f
    # The label's own component a_y - 1 as ((e_y - 1) - T) / (1 + T), never as a_y - 1:
    # e_y - 1 is exact at the max (0) and T keeps the digits a confident row needs.
    num_local = z.shape[-1]
    local = ints.safe - tg.class_offset(num_local, opts.axis_name)
    z_y = jnp.take_along_axis(z, jnp.clip(local, 0, num_local - 1)[..., None], axis=-1)
    e_y = jnp.exp(nm.shifted(z_y, stats.m))
    label_grad = ((e_y - 1) - stats.T) / partition + lse_term * e_y / partition
    if eps:
        f_y = jnp.isfinite(z_y).astype(z.dtype)
        label_grad = label_grad + eps * (1 - f_y / k)
    label_grad = jnp.where(bad, jnp.nan, label_grad * w)
    # Written over the one entry per row in place (a scatter of rows values), not chosen by a
    # compare and select on every entry: the pass that writes the gradient stays a plain
    # multiply. Labels of other shards fall outside [0, num_local) and are dropped.
    grad = _set_label_entries(grad, local, label_grad[..., 0])
    if mask is not None:  # excluded classes do not exist: gradient 0 even in a NaN row
        grad = jnp.where(mask, grad, zero)
    return grad


_rows.defvjp(_rows_fwd, _rows_bwd)
