r"""Row statistics of a softmax, computed without cancellation.

Everything in this package is built on three numbers per row of logits :math:`z`:

.. math::

   m = \max_j z_j, \qquad
   t = \#\{j : z_j = m\}, \qquad
   s = \sum_{j : z_j < m} e^{z_j - m},

so that the partition function is :math:`\sum_j e^{z_j - m} = t + s` and

.. math::

   \log\sum_j e^{z_j} = m + \operatorname{log1p}(T), \qquad T = (t - 1) + s.

Why this form:

* The textbook ``log(sum(exp(z - m)))`` rounds ``1 + s`` before the log, so every digit of a
  small ``s`` is lost; a confident prediction whose true loss is 1e-9 comes out as 0. Leaving
  the max entries out of the sum and adding them back *exactly* as the integer ``t - 1`` keeps
  ``s`` intact for ``log1p``.
* ``1 - a_max = T / (1 + T)`` and ``a_y - 1 = ((e^{z_y - m} - t) - s) / (t + s)`` follow from the
  same numbers, with no ``1 - (something close to 1)`` anywhere.
* Exact ties are ordinary: tied maxima all land in ``t``.

How it stays fast and differentiable:

* The max entries are dropped with arithmetic, not with a select: ``-sign(d)`` is 1 below the
  max and 0 at it, and ``1 + sign(d)`` is the reverse. Selects and boolean counts inside a
  reduction stop XLA:CPU from vectorizing the loop; a multiply does not.
* Both sums are weighted by ``e = exp(d)``: ``t = sum((1 + sign d) * e)`` has the exact integer
  value (``exp(0) == 1``) *and* the derivative of the max entries' share of the partition
  function. ``m`` is therefore a ``stop_gradient`` constant: the formulas are invariant to it,
  autodiff of ``t + s`` gives the softmax, and higher derivatives are right too.
* Rows with nothing included (all masked or all ``-inf``) get ``m = 0`` so that ``d = -inf``
  rather than ``-inf - (-inf) = nan``; their ``T`` is replaced by 0 before ``log1p`` so that no
  ``inf * 0`` reaches a gradient.

With ``axis_name``, the class axis is split over a mapped mesh axis and the row statistics are
combined with ``pmax`` (the max) and ``psum`` (the sums); everything else is local.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def compute_dtype(dtype) -> jnp.dtype:
    """16-bit floats are computed in float32; float32 and float64 in themselves."""
    return jnp.promote_types(dtype, jnp.float32)


def mask_logits(z: jax.Array, where: jax.Array | None) -> jax.Array:
    """Excluded entries become ``-inf``: probability exactly 0 and no gradient."""
    return z if where is None else jnp.where(where, z, -jnp.inf)


def psum(x: jax.Array, axis_name) -> jax.Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def row_max(z: jax.Array, axis: int, axis_name=None) -> jax.Array:
    """The row max as a constant (keepdims), 0 for rows whose max is ``-inf``."""
    m = lax.stop_gradient(jnp.max(z, axis, keepdims=True))
    if axis_name is not None:
        m = lax.pmax(m, axis_name)
    # An empty row keeps d = z - m = -inf instead of nan.
    return jnp.where(m == -jnp.inf, jnp.zeros((), m.dtype), m)


class RowStats(NamedTuple):
    """Per-row statistics, each with the class axis kept as size 1."""

    m: jax.Array  # row max (constant for autodiff); 0 for empty rows
    t: jax.Array  # number of entries equal to the max, 0 for empty rows
    s: jax.Array  # sum of exp(z - m) over the entries below the max

    @property
    def nonempty(self) -> jax.Array:
        return self.t > 0

    @property
    def T(self) -> jax.Array:  # noqa: N802  (the T of the module docstring)
        """``(t - 1) + s`` where the row has an entry, 0 where it has none."""
        return jnp.where(self.nonempty, (self.t - 1) + self.s, jnp.zeros((), self.s.dtype))

    @property
    def log_z(self) -> jax.Array:
        """``log(t + s)``, the log partition function relative to ``m``, as ``log1p(T)``."""
        return jnp.log1p(self.T)

    @property
    def lse(self) -> jax.Array:
        """``logsumexp``: ``m + log1p(T)``, and ``-inf`` for an empty row."""
        return jnp.where(self.nonempty, self.m + self.log_z, -jnp.inf)

    @property
    def partition(self) -> jax.Array:
        """``t + s`` (1 for an empty row, so that dividing by it is always safe)."""
        return 1 + self.T


def row_stats(z: jax.Array, axis: int = -1, axis_name=None) -> tuple[RowStats, jax.Array]:
    """Statistics of each row of ``z`` (already masked) and the shifted logits ``d = z - m``."""
    m = row_max(z, axis, axis_name)
    d = z - m
    e = jnp.exp(d)
    sg = jnp.sign(d)  # 0 at the max, -1 below it (and -1 for -inf entries, whose e is 0)
    t = jnp.sum((1 + sg) * e, axis, keepdims=True)
    s = jnp.sum(-sg * e, axis, keepdims=True)
    return RowStats(m, psum(t, axis_name), psum(s, axis_name)), d


def partition_sum(z: jax.Array, axis: int = -1, axis_name=None) -> tuple[jax.Array, jax.Array]:
    """``(exp(z - m), sum exp(z - m))``: all the softmax itself needs (no ``log1p`` later)."""
    m = row_max(z, axis, axis_name)
    e = jnp.exp(z - m)
    total = psum(jnp.sum(e, axis, keepdims=True), axis_name)
    # Empty rows: e is all 0; divide by 1 to return zeros.
    return e, jnp.where(total > 0, total, jnp.ones((), total.dtype))
