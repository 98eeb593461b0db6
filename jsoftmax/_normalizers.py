r"""Softmax, log-softmax and logsumexp: drop-in for :mod:`jax.nn`, accurate to a few ulps.

All three are plain JAX code differentiated by JAX's own autodiff (no custom rule), built on the
row statistics of :mod:`jsoftmax._numerics`. Differences from :mod:`jax.nn`:

* ``log_softmax`` and ``logsumexp`` use ``log1p`` of the sum with the max entry left out, so a
  confident row keeps its digits (``jax.nn.log_softmax([20., 0, 0])[0]`` is ``0.0``; the true
  value is ``-4.12e-9``).
* A row with nothing included (all excluded by ``where`` or all ``-inf``) gives ``softmax`` 0,
  ``log_softmax`` and ``logsumexp`` ``-inf``, and a zero gradient, never NaN.
* Excluded entries are set to ``-inf`` *before* anything else, so a huge masked logit cannot
  produce ``inf * 0`` in the gradient (jax #19490).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from . import _numerics as nm
from . import _validation as val


def _prepare(x: ArrayLike, axis: int, where: ArrayLike | None, name: str = "x"):
    x = val.float_array(x, name)
    axis = val.class_axis(axis, x.shape, name)
    mask = val.where_mask(where, x.shape)
    z = nm.compute_logits(x, mask)
    return x, z, axis, mask


def softmax(x: ArrayLike, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
    r"""Softmax: probabilities from unnormalized log-probabilities.

    Numerically stable: the row max is subtracted before ``exp``. Entries excluded by ``where``
    and ``-inf`` entries get probability exactly 0; a row with nothing included gives zeros.

    .. math::

       \mathrm{softmax}(x)_i = \frac{e^{x_i - m}}{\sum_j e^{x_j - m}}, \qquad m = \max_j x_j

    Args:
      x: logits, shape ``[..., num_classes, ...]``; any floating dtype (16-bit inputs are
        computed in float32).
      axis: the class axis.
      where: optional boolean mask broadcastable to ``x``: the entries that take part.

    Returns:
      Probabilities, the shape and dtype of ``x``.

    Examples:
      >>> import jax.numpy as jnp, jsoftmax as jsm
      >>> print(jsm.softmax(jnp.array([1.0, 2.0, 3.0])))
      [0.09003057 0.24472848 0.66524094]
      >>> jsm.softmax(jnp.array([123.0, 456.0, 789.0]))
      Array([0., 0., 1.], dtype=float32)
      >>> mask = jnp.array([True, True, False])
      >>> print(jsm.softmax(jnp.array([1.0, 2.0, 3.0]), where=mask))
      [0.26894143 0.7310586  0.        ]
    """
    x, z, axis, _ = _prepare(x, axis, where)
    e, total = nm.partition_sum(z, axis, narrow=nm.narrow_dtype(x.dtype))
    return (e / total).astype(x.dtype)


def log_softmax(x: ArrayLike, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
    r"""Log-softmax, accurate to a few ulps even for confident rows.

    .. math::

       \log \mathrm{softmax}(x)_i = (x_i - m) - \operatorname{log1p}\Big((t - 1) +
       \sum_{j: x_j < m} e^{x_j - m}\Big)

    where :math:`m` is the row max and :math:`t` the number of entries equal to it. Leaving the
    max out of the sum and using ``log1p`` avoids rounding ``1 + tiny`` to 1.

    Args:
      x: logits, shape ``[..., num_classes, ...]``; any floating dtype.
      axis: the class axis.
      where: optional boolean mask broadcastable to ``x``: the entries that take part.

    Returns:
      Log-probabilities, the shape and dtype of ``x``; ``-inf`` where excluded.

    Examples:
      >>> import jax.numpy as jnp, jsoftmax as jsm
      >>> print(f"{float(jsm.log_softmax(jnp.array([20.0, 0.0, 0.0]))[0]):.4e}")
      -4.1223e-09
      >>> jsm.log_softmax(jnp.array([0.0, 0.0]), where=jnp.array([False, False]))
      Array([-inf, -inf], dtype=float32)
    """
    x, z, axis, mask = _prepare(x, axis, where)
    stats, d = nm.row_stats(z, axis, narrow=nm.narrow_dtype(x.dtype))
    # Excluded entries and empty rows are the constant -inf: zero tangent, as in jax.nn.
    keep = stats.nonempty if mask is None else stats.nonempty & mask
    out = jnp.where(keep, d - stats.log_z, -jnp.inf)
    return out.astype(x.dtype)


def logsumexp(
    x: ArrayLike, axis: int = -1, where: ArrayLike | None = None, keepdims: bool = False
) -> jax.Array:
    r"""Log of the sum of exponentials along ``axis``, accurate to a few ulps.

    .. math::

       \log \sum_j e^{x_j} = m + \operatorname{log1p}\Big((t - 1) +
          \sum_{j: x_j < m} e^{x_j - m}\Big)

    Args:
      x: input array, shape ``[..., n, ...]``; any floating dtype.
      axis: the axis to reduce.
      where: optional boolean mask broadcastable to ``x``: the entries that take part.
      keepdims: keep the reduced axis with size 1.

    Returns:
      The shape of ``x`` without ``axis`` (or with it as size 1), dtype of ``x``. ``-inf`` for a
      row with nothing included; its gradient is zero.

    Examples:
      >>> import jax.numpy as jnp, jsoftmax as jsm
      >>> print(jsm.logsumexp(jnp.array([[0.0, 0.0], [1e4, 1e4]])))
      [6.9314718e-01 1.0000693e+04]
    """
    x, z, axis, _ = _prepare(x, axis, where)
    stats, _ = nm.row_stats(z, axis, narrow=nm.narrow_dtype(x.dtype))
    out = _plus_inf_rows(stats.lse, stats.m, z, axis)
    if not keepdims:
        out = jnp.squeeze(out, axis)
    return out.astype(x.dtype)


def _plus_inf_rows(lse, m, rows, axis):
    """``+inf`` for rows whose max is ``+inf`` and that hold no NaN (as jax and scipy give).

    ``m + log1p(T)`` is NaN there (``inf - inf`` in ``T``). Rows with a NaN stay NaN: their max
    is NaN, except where XLA:CPU's fused max drops it, so the NaN is looked for explicitly, and
    only when some row has a ``+inf`` max (``lax.cond``: no pass over the input otherwise).
    """
    pos = m == jnp.inf

    def fix(lse):
        nan = jnp.any(jnp.isnan(rows), axis, keepdims=True)
        return jnp.where(pos, jnp.where(nan, jnp.nan, jnp.inf).astype(lse.dtype), lse)

    return lax.cond(jnp.any(pos), fix, lambda lse: lse, lse)


def softmax_jacobian(x: ArrayLike, axis: int = -1) -> jax.Array:
    r"""The analytic Jacobian of :func:`softmax`: :math:`J_{ij} = a_i(\delta_{ij} - a_j)`.

    The diagonal uses :math:`1 - a_i = T/(1 + T)` at the max entries, so it keeps its relative
    accuracy when a row is confident. Equal to ``jax.jacfwd(softmax)`` row by row.

    .. math::

       J = \operatorname{diag}(a) - a a^\top, \qquad a = \mathrm{softmax}(x)

    Args:
      x: logits, shape ``[..., num_classes, ...]``.
      axis: the class axis.

    Returns:
      Shape ``x.shape`` with the class axis moved last plus one more class axis:
      ``[..., C, C]``, dtype of ``x``.

    Examples:
      >>> import jax.numpy as jnp, jsoftmax as jsm
      >>> jsm.softmax_jacobian(jnp.array([0.0, 0.0]))
      Array([[ 0.25, -0.25],
             [-0.25,  0.25]], dtype=float32)
    """
    x, z, axis, _ = _prepare(x, axis, None)
    z = jnp.moveaxis(z, axis, -1)
    stats, d = nm.row_stats(z, -1, narrow=nm.narrow_dtype(x.dtype))
    a = jnp.exp(d) / stats.partition
    # 1 - a_i: for any max entry (d == 0) it is T / (1 + T) exactly; below the max a_i <= 1/2
    # and the subtraction is benign.
    one_minus_a = jnp.where(d == 0, stats.T / stats.partition, 1 - a)
    outer = -a[..., :, None] * a[..., None, :]
    diag = a * one_minus_a
    num_classes = a.shape[-1]
    eye = jnp.eye(num_classes, dtype=bool).reshape((1,) * (a.ndim - 1) + (num_classes, num_classes))
    return jnp.where(eye, diag[..., :, None], outer).astype(x.dtype)
