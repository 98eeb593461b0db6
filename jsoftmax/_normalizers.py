r"""Softmax, log-softmax and logsumexp: drop-in for :mod:`jax.nn`, accurate to a few ulps.

Same signatures, defaults and argument forms as ``jax.nn.softmax``, ``jax.nn.log_softmax`` and
``jax.nn.logsumexp`` (``axis`` an int, a tuple of ints or None; ``logsumexp``'s ``b``,
``keepdims``, ``return_sign``; ``where``; integer and complex inputs; empty arrays and scalars).
The values come from the row statistics of :mod:`jsoftmax._numerics`; several reduced axes are
flattened into one row first.

Each function is a ``jax.custom_jvp`` whose primal is that accurate computation and whose tangent
is the textbook one:

.. math::

   \dot a = a \odot (\dot x - \langle a, \dot x\rangle), \qquad
   \dot{\log a} = \dot x - \langle a, \dot x\rangle, \qquad
   \dot{\mathrm{lse}} = \langle a, \dot x\rangle .

So every transformation works (``jvp``, ``grad``, ``jacfwd``, ``jacrev``, ``hessian`` and
higher orders: the tangent is built from these functions again), and reverse mode keeps one array
of the input's size and dtype, the probabilities :math:`a`, plus ``where`` and one flag per row.
The tangent is computed under ``jax.checkpoint``, so that what it derives from them (a float32
copy of 16-bit probabilities, a broadcast mask) is recomputed in the backward pass, not kept.

Differences from :mod:`jax.nn`:

* ``log_softmax`` and ``logsumexp`` use ``log1p`` of the sum with the max entry left out, so a
  confident row keeps its digits (``jax.nn.log_softmax([20., 0, 0])[0]`` is ``0.0``; the true
  value is ``-4.12e-9``).
* A row with nothing included (all excluded by ``where`` or all ``-inf``) gives ``softmax`` 0,
  ``log_softmax`` and ``logsumexp`` ``-inf``, and a zero gradient, never NaN.
* Excluded entries are set to ``-inf`` *before* anything else, so a huge masked logit cannot
  produce ``inf * 0`` in the gradient (jax #19490).
* ``logsumexp`` with ``b`` sums :math:`b_j e^{a_j - m}` as jax.nn and scipy do (terms that
  cancel exactly still cancel), but with one max entry left out of the sum and ``log1p``, so
  that ``b = 1`` keeps the digits of the plain logsumexp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from . import _numerics as nm
from . import _validation as val
from ._platform import by_platform

Axis = int | tuple[int, ...] | None

# The tangents are recomputed from their inputs in the backward pass (see the module docstring).
# prevent_cse=False: no optimization barrier, which would make XLA write the probabilities out as
# an array of their own when forward and backward run in one program (a 128 MiB temporary and
# 40% more time for the gradient of softmax at [1024, 32768], measured); CSE of the recomputed
# tangent with the forward pass is what we want here.
_remat = functools.partial(
    jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False
)


# ------------------------------------------------------------------------------ argument handling


def _prepare(x, axis, where, b=None, name="x"):
    """Validated ``(x, where, b, axes)``: ``x`` broadcast against ``where`` and ``b`` (as jax.nn
    does), ``where`` and ``b`` left unbroadcast, ``axes`` sorted non-negative ints. ``name``:
    the argument's name in messages."""
    x = val.inexact_array(x, name)
    shape = x.shape
    if where is not None:
        where = val.bool_array(where)
        shape = val.broadcast_shape(shape, where, "where", "the input's")
    if b is not None:
        b = val.inexact_array(b, "b")
        shape = val.broadcast_shape(shape, b, "b", "the input's")
    if shape != x.shape:
        x = jnp.broadcast_to(x, shape)
    axes = tuple(sorted(val.canonical_axes(axis, len(shape))))
    return x, where, b, axes


def _full(v: jax.Array | None, shape) -> jax.Array | None:
    return None if v is None else jnp.broadcast_to(v, shape)


def _to_rows(v: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, int]:
    """``v`` with the reduced ``axes`` as one row axis: ``(v, axis)`` for one axis (unchanged),
    else the batch axes in order and the reduced axes flattened last (``(rows, -1)``)."""
    if len(axes) == 1:
        return v, axes[0]
    batch = [i for i in range(v.ndim) if i not in axes]
    perm = batch + list(axes)
    rows = jnp.transpose(v, perm) if perm != list(range(v.ndim)) else v
    return rows.reshape(tuple(v.shape[i] for i in batch) + (-1,)), len(batch)


def _from_rows(r: jax.Array, shape, axes: tuple[int, ...]) -> jax.Array:
    """Inverse of ``_to_rows`` for an array of the input's ``shape``."""
    if len(axes) == 1:
        return r
    batch = [i for i in range(len(shape)) if i not in axes]
    perm = batch + list(axes)
    r = r.reshape(tuple(shape[i] for i in perm))
    inverse = tuple(int(i) for i in np.argsort(perm))
    return jnp.transpose(r, inverse) if perm != list(range(len(shape))) else r


def _row_values(r: jax.Array, shape, axes: tuple[int, ...], keepdims: bool) -> jax.Array:
    """Per-row values of ``_to_rows`` layout (reduced axis kept as 1) in the caller's layout:
    the input's shape without ``axes``, or with them as size 1 when ``keepdims``."""
    if len(axes) == 1:
        return r if keepdims else jnp.squeeze(r, axes[0])
    batch_shape = tuple(n for i, n in enumerate(shape) if i not in axes)
    r = r.reshape(batch_shape)
    return jnp.expand_dims(r, axes) if keepdims else r


def _reduced_shape(shape, axes, keepdims):
    return tuple(1 if i in axes else n for i, n in enumerate(shape) if keepdims or i not in axes)


# ------------------------------------------------------------------------------------ softmax


def softmax(x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> jax.Array:
    r"""Softmax: probabilities from unnormalized log-probabilities, as :func:`jax.nn.softmax`.

    Numerically stable: the row max is subtracted before ``exp``. Entries excluded by ``where``
    and ``-inf`` entries get probability exactly 0; a row with nothing included gives zeros
    (``jax.nn`` gives NaN there).

    .. math::

       \mathrm{softmax}(x)_i = \frac{e^{x_i - m}}{\sum_j e^{x_j - m}}, \qquad m = \max_j x_j

    Args:
      x: logits, any shape; any floating dtype (16-bit inputs are computed in float32; integer
        inputs are converted to float as ``jax.nn`` does; complex inputs are accepted too).
      axis: the axis or axes to normalize over: an int, a tuple of ints, or None (all axes).
      where: optional boolean mask broadcastable with ``x``: the entries that take part.

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
      >>> print(jsm.softmax(jnp.zeros((2, 2)), axis=None))
      [[0.25 0.25]
       [0.25 0.25]]
    """
    return _normalize(x, axis, where, log=False)


def _normalize(x, axis, where, log: bool):
    """``softmax`` (or ``log_softmax``) after the shared argument handling: empty inputs come
    back as they are, complex ones take jax.nn's formula, real ones the stable kernels."""
    x, where, _, axes = _prepare(x, axis, where)
    if x.size == 0:
        return x
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return _complex_softmax(x, where, axes, log=log)
    return (_log_softmax if log else _softmax)(x, where, axes)


def _softmax_sums(x, where, axes):
    """``(exp(z - m), sum exp(z - m))`` in the row layout of ``_to_rows``."""
    z = nm.compute_logits(x, _full(where, x.shape))
    rows, axis = _to_rows(z, axes)
    return nm.partition_sum(rows, axis, narrow=nm.narrow_dtype(x.dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _softmax(x, where, axes):
    e, total = _softmax_sums(x, where, axes)
    return _from_rows(e / total, x.shape, axes).astype(x.dtype)


@_softmax.defjvp
def _softmax_jvp(axes, primals, tangents):
    x, where = primals
    e, total = _softmax_sums(x, where, axes)
    a = _from_rows(e / total, x.shape, axes).astype(x.dtype)
    # Saved for reverse mode: one array of the input's size and dtype, and for 32/64-bit inputs
    # one number per row. Excluded entries and empty rows are 0 in it, so their tangent is 0
    # with no mask. 16-bit inputs keep a itself (float32 exponentials would be twice jax.nn's
    # residual); wider ones keep exp(z - m) and 1 / sum, which XLA fuses into the backward pass
    # as it does for autodiff of e / sum (keeping a instead wrote it out as a temporary of its
    # own next to exp(z - m): 128 MiB and 30% more time for the gradient at [1024, 32768]),
    # unless jax's own softmax keeps its output only (jax.softmax_custom_jvp, on by default
    # from jax 0.11): then so does this one, so that it never keeps more than jax.nn.
    if nm.narrow_dtype(x.dtype) is not None or _jax_softmax_keeps_its_output():
        saved, scale = a, None
    else:
        saved = _from_rows(e, x.shape, axes)
        scale = _row_values(1 / total, x.shape, axes, keepdims=True)
    return a, _remat(_softmax_tangent, static_argnums=(3,))(saved, scale, tangents[0], axes)


def _jax_softmax_keeps_its_output() -> bool:
    """Whether ``jax.nn.softmax`` saves only its output for reverse mode (its custom JVP)."""
    return bool(getattr(jax.config, "jax_softmax_custom_jvp", True))


def _softmax_tangent(saved, scale, dx, axes):
    """``a (dx - <a, dx>)`` with ``a = saved`` or ``saved * scale``, in the compute dtype.

    With ``a = e s`` (``s = 1 / sum e``) it is spelled as the tangent of ``e s`` itself,
    ``(e dx) s - e s^2 <e, dx>``, whose transpose reduces ``e g`` and scales ``e`` apart; the
    transpose of ``a (dx - <a, dx>)`` shares ``a g`` between the two, which XLA:CPU writes out.
    """
    cdt = nm.compute_dtype(saved.dtype)
    e, dx32 = saved.astype(cdt), dx.astype(cdt)
    if scale is None:
        return (e * (dx32 - jnp.sum(e * dx32, axes, keepdims=True))).astype(dx.dtype)
    de = e * dx32
    return (de * scale - e * (scale * scale * jnp.sum(de, axes, keepdims=True))).astype(dx.dtype)


# --------------------------------------------------------------------------------- log_softmax


def log_softmax(x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> jax.Array:
    r"""Log-softmax, accurate to a few ulps even for confident rows; as :func:`jax.nn.log_softmax`.

    .. math::

       \log \mathrm{softmax}(x)_i = (x_i - m) - \operatorname{log1p}\Big((t - 1) +
       \sum_{j: x_j < m} e^{x_j - m}\Big)

    where :math:`m` is the row max and :math:`t` the number of entries equal to it. Leaving the
    max out of the sum and using ``log1p`` avoids rounding ``1 + tiny`` to 1.

    Args:
      x: logits, any shape; any floating dtype (integer and complex inputs as in ``jax.nn``).
      axis: the axis or axes to normalize over: an int, a tuple of ints, or None (all axes).
      where: optional boolean mask broadcastable with ``x``: the entries that take part.

    Returns:
      Log-probabilities, the shape and dtype of ``x``; ``-inf`` where excluded, and in a row with
      nothing included (``jax.nn`` gives NaN there).

    Examples:
      >>> import jax.numpy as jnp, jsoftmax as jsm
      >>> print(f"{float(jsm.log_softmax(jnp.array([20.0, 0.0, 0.0]))[0]):.4e}")
      -4.1223e-09
      >>> jsm.log_softmax(jnp.array([0.0, 0.0]), where=jnp.array([False, False]))
      Array([-inf, -inf], dtype=float32)
    """
    return _normalize(x, axis, where, log=True)


def _log_softmax_parts(x, where, axes):
    """``(log a, row stats, d, mask)`` in the row layout of ``_to_rows``."""
    mask = _full(where, x.shape)
    z = nm.compute_logits(x, mask)
    rows, axis = _to_rows(z, axes)
    stats, d = nm.row_stats(rows, axis, narrow=nm.narrow_dtype(x.dtype))
    # Excluded entries and empty rows are the constant -inf.
    keep = stats.nonempty if mask is None else stats.nonempty & _to_rows(mask, axes)[0]
    return jnp.where(keep, d - stats.log_z, -jnp.inf), stats, d


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _log_softmax(x, where, axes):
    out, _, _ = _log_softmax_parts(x, where, axes)
    return _from_rows(out, x.shape, axes).astype(x.dtype)


@_log_softmax.defjvp
def _log_softmax_jvp(axes, primals, tangents):
    x, where = primals
    out, stats, d = _log_softmax_parts(x, where, axes)
    out = _from_rows(out, x.shape, axes).astype(x.dtype)
    # The probabilities exp(d) / S (0 at excluded entries and in empty rows), more accurate than
    # exp(out) far below the max; with `where` and one flag per row, all reverse mode keeps.
    a = _from_rows(jnp.exp(d) * (1 / stats.partition), x.shape, axes).astype(x.dtype)
    nonempty = _row_values(stats.nonempty, x.shape, axes, keepdims=True)
    tangent = _remat(_log_softmax_tangent, static_argnums=(4,))(
        a, nonempty, where, tangents[0], axes
    )
    return out, tangent


def _log_softmax_tangent(a, nonempty, where, dx, axes):
    cdt = nm.compute_dtype(a.dtype)
    a32, dx32 = a.astype(cdt), dx.astype(cdt)
    t = dx32 - jnp.sum(a32 * dx32, axes, keepdims=True)
    zero = jnp.zeros((), cdt)
    t = jnp.where(jnp.broadcast_to(nonempty, t.shape), t, zero)
    if where is not None:
        t = jnp.where(jnp.broadcast_to(where, t.shape), t, zero)
    return t.astype(a.dtype)


# ----------------------------------------------------------------------------------- logsumexp


def logsumexp(
    a: ArrayLike,
    axis: Axis = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log of the sum of exponentials, accurate to a few ulps; as :func:`jax.nn.logsumexp`.

    .. math::

       \log \sum_j b_j e^{a_j} = m + \operatorname{log1p}\Big((t - 1) +
          \sum_{j: a_j < m} e^{a_j - m}\Big) \quad (b = 1)

    With scale factors ``b``, :math:`S = \sum_j b_j e^{a_j - m}` is summed as it stands (as
    jax.nn and scipy do), except for one max entry :math:`k`, so that
    :math:`\log|S| = \operatorname{log1p}\big((s\,b_k - 1) + s \sum_{j \ne k} b_j e^{a_j - m}\big)`
    with :math:`s = \operatorname{sign} S` never rounds ``1 + tiny``.

    Args:
      a: input array, any shape; any floating dtype (integer and complex inputs as in
        ``jax.nn``).
      axis: the axis or axes to reduce: an int, a tuple of ints, or None (all axes, the
        default, as in ``jax.nn.logsumexp``).
      b: optional scale factors broadcastable with ``a``; may be negative or zero (an entry with
        ``b = 0`` takes no part, and its gradient with respect to ``b`` is 0, as in ``jax.nn``).
      keepdims: keep the reduced axes with size 1.
      return_sign: return ``(log|sum|, sign(sum))``; otherwise a negative sum gives NaN.
      where: optional boolean mask broadcastable with ``a``: the entries that take part.

    Returns:
      The shape of ``a`` without ``axis`` (or with it as size 1), dtype of ``a`` (promoted with
      ``b``'s). ``-inf`` for a row with nothing included (sign 0); its gradient is zero.

    Examples:
      >>> import jax.numpy as jnp, jsoftmax as jsm
      >>> print(jsm.logsumexp(jnp.array([[0.0, 0.0], [1e4, 1e4]]), axis=-1))
      [6.9314718e-01 1.0000693e+04]
      >>> print(jsm.logsumexp(jnp.array([0.0, 0.0, 0.0, 0.0])))
      1.3862944
      >>> print(jsm.logsumexp(jnp.array([1.0, 1.0]), b=jnp.array([2.0, -3.0]), return_sign=True))
      (Array(1., dtype=float32), Array(-1., dtype=float32))
    """
    if b is not None:
        # a and b are promoted together, as jax.nn does (under the active promotion rules).
        a = val.inexact_array(a, "a")
        b = val.inexact_array(b, "b")
        dtype = jnp.result_type(a, b)
        a, b = a.astype(dtype), b.astype(dtype)
    x, where, b, axes = _prepare(a, axis, where, b, name="a")
    keepdims, return_sign = bool(keepdims), bool(return_sign)
    if x.size == 0:  # every row empty: log 0, sign 0
        shape = _reduced_shape(x.shape, axes, keepdims)
        complex_sign = return_sign and jnp.issubdtype(x.dtype, jnp.complexfloating)
        out = jnp.full(shape, -jnp.inf, jnp.finfo(x.dtype).dtype if complex_sign else x.dtype)
        return (out, jnp.zeros(shape, x.dtype)) if return_sign else out
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return _complex_logsumexp(x, b, where, axes, keepdims, return_sign)
    out, sign = _logsumexp(x, b, where, axes, keepdims, return_sign)
    return (out, sign) if return_sign else out


# The branches of the conditionals below are module-level functions (one per static `axes`):
# lax.cond caches its compiled branches by function identity, and a closure made afresh on
# every call would compile the conditional again on every eager call.


def _keep(*operands):
    return operands[0]


@functools.cache
def _nan_or_inf(axes: tuple[int, ...]):
    def fix(lse, pos, x, where):
        nan = jnp.isnan(x) if where is None else jnp.isnan(x) & jnp.broadcast_to(where, x.shape)
        nan = jnp.any(nan, axes, keepdims=True).reshape(lse.shape)
        with jax.debug_nans(False):  # NaN by design, not by accident
            inf_or_nan = jnp.where(nan, jnp.asarray(jnp.nan, lse.dtype), jnp.inf)
        return jnp.where(pos, inf_or_nan, lse)

    return fix


def _plus_inf_rows(lse, m, x, where, axes):
    """``+inf`` for rows whose max is ``+inf`` and that hold no NaN (as jax and scipy give).

    ``m + log1p(T)`` is NaN there (``inf - inf`` in ``T``). Rows with a NaN stay NaN: their max
    is NaN, except where XLA:CPU's fused max drops it, so the NaN is looked for explicitly, and
    only when some row has a ``+inf`` max (``lax.cond``: no pass over the input otherwise). It
    looks at the input as given (``x``, ``where``, reduced over ``axes``), not at a widened or
    transposed copy: an operand of the conditional would be written out in full.
    ``lse``, ``m``: row layout (``_to_rows``).
    """
    pos = m == jnp.inf
    return lax.cond(jnp.any(pos), _nan_or_inf(axes), _keep, lse, pos, x, where)


def _plus_inf_rows_portable(lse, m, z, axis):
    """``_plus_inf_rows`` with the NaN looked for in the pass that sums the row (``z``: the
    masked rows), as a float32 count beside the row statistics' sums: the TPU compiler fuses it
    into their pass, where a conditional's branch, or a boolean ``any``, is a pass of its own."""
    nan = jnp.sum(jnp.isnan(z).astype(jnp.float32), axis, keepdims=True) > 0
    with jax.debug_nans(False):  # NaN by design, not by accident
        inf_or_nan = jnp.where(nan, jnp.asarray(jnp.nan, lse.dtype), jnp.inf)
    return jnp.where(m == jnp.inf, inf_or_nan, lse)


@functools.cache
def _scaled_sum(axis: int):
    def fix(out_sign, pos, rows, b, take):
        out, sign = out_sign
        total = jnp.sum(jnp.where(take, jnp.exp(rows) * b, 0), axis, keepdims=True)
        return jnp.where(pos, jnp.log(jnp.abs(total)), out), jnp.where(pos, jnp.sign(total), sign)

    return fix


def _plus_inf_rows_scaled(out, sign, m, rows, b, take, axis):
    """With ``b``: in rows whose max is ``+inf`` the sum is ``sum b e^a`` itself, ``+inf``,
    ``-inf`` or NaN (``+inf`` entries of both signs), as jax.nn gives; only when some row has a
    ``+inf`` max (``lax.cond``)."""
    pos = m == jnp.inf
    return lax.cond(jnp.any(pos), _scaled_sum(axis), _keep, (out, sign), pos, rows, b, take)


def _row_lse(z, axis, narrow, x, where, axes):
    """Row statistics of ``z`` (masked, row layout) and its accurate logsumexp (keepdims);
    ``x``, ``where``, ``axes``: the input ``z`` comes from (see ``_plus_inf_rows``)."""
    stats, d = nm.row_stats(z, axis, narrow=narrow)
    cpu, portable = _plus_inf_branches(axis, axes)
    return stats, d, by_platform(cpu, portable, stats.lse, stats.m, z, x, where)


@functools.cache
def _plus_inf_branches(axis: int, axes: tuple[int, ...]):
    def cpu(lse, m, z, x, where):
        return _plus_inf_rows(lse, m, x, where, axes)

    def portable(lse, m, z, x, where):
        return _plus_inf_rows_portable(lse, m, z, axis)

    return cpu, portable


def _logsumexp_parts(x, b, where, axes, return_sign):
    """``(out, sign, a)`` in row layout: the result, its sign, and the weights ``a`` of the
    tangent, :math:`\\dot{out} = \\sum a\\,(b\\,\\dot x + \\dot b)` (``b = 1`` when absent)."""
    mask = _full(where, x.shape)
    cdt = nm.compute_dtype(x.dtype)
    narrow = nm.narrow_dtype(x.dtype)
    if b is None:
        z = nm.compute_logits(x, mask)
        rows, axis = _to_rows(z, axes)
        stats, d, out = _row_lse(rows, axis, narrow, x, where, axes)
        # The softmax: 0 where excluded and in empty rows. A +inf row's S is NaN; its weights
        # are exp(d): 0 for the finite entries, NaN at +inf, as jax.nn's.
        weights = jnp.where(stats.m == jnp.inf, jnp.exp(d), jnp.exp(d) * (1 / stats.partition))
        sign = jnp.where(out > -jnp.inf, 1, 0).astype(cdt)
        return out, jnp.where(jnp.isnan(out), out, sign), weights
    bb = jnp.broadcast_to(b, x.shape).astype(cdt)
    # An entry with b = 0 takes no part (jax.nn's convention, gradients included).
    take = bb != 0 if mask is None else mask & (bb != 0)
    z = nm.compute_logits(x, take)
    rows, axis = _to_rows(z, axes)
    brows = _to_rows(bb, axes)[0]
    take_rows = _to_rows(take, axes)[0]
    # S = sum b e^{a - m} summed as it stands, as jax.nn and scipy do, so that terms that cancel
    # exactly still do; but with one max entry k left out of the sum, R = S - b_k (e^{a_k - m}
    # is exactly 1), so that near |S| = 1 log|S| = log1p((s b_k - 1) + s R), s = sign(S), never
    # rounds 1 + tiny: with b = 1 it is the plain logsumexp to the same digits.
    m = nm.finite_shift(nm.raw_max(rows, axis))
    d = nm.shifted(rows, m)  # 0 at the max entries, -inf where no part is taken
    terms = jnp.where(take_rows, brows * jnp.exp(d), jnp.zeros((), cdt))
    k = jnp.argmax(jnp.where(take_rows, d, -jnp.inf), axis, keepdims=True)
    at_k = lax.broadcasted_iota(k.dtype, rows.shape, axis) == k
    zero = jnp.zeros((), cdt)
    rest = jnp.sum(jnp.where(at_k, zero, terms), axis, keepdims=True)
    b_k = jnp.sum(jnp.where(at_k, terms, zero), axis, keepdims=True)  # 0 in an empty row
    total = b_k + rest
    s = jnp.where(total < 0, -1, 1).astype(cdt)
    # log1p where |S| is near 1; elsewhere |S| - 1 would cost |S|'s own digits (near -1).
    near_one = (jnp.abs(total) >= 0.5) & (jnp.abs(total) <= 2)
    rel = jnp.where(near_one, jnp.log1p((s * b_k - 1) + s * rest), jnp.log(jnp.abs(total)))
    out = m + rel
    sign = jnp.where(jnp.isnan(out), out, jnp.sign(total))
    out, sign = _plus_inf_rows_scaled(out, sign, m, rows, brows, take_rows, axis)
    # d out / d(b e^a) = sign e^{a - out} = sign e^{d - rel} on the entries that take part.
    finite = jnp.isfinite(out)
    e = jnp.exp(d - jnp.where(finite, rel, 0))
    weights = jnp.where(finite, sign * e, jnp.where(out == jnp.inf, e, 0))
    weights = jnp.where(take_rows, weights, jnp.zeros((), cdt))
    if not return_sign:
        with jax.debug_nans(False):  # a NaN by design, not by accident
            out = jnp.where(sign < 0, jnp.asarray(jnp.nan, cdt), out)  # log of a negative sum
        weights = jnp.where(sign < 0, jnp.zeros((), cdt), weights)
    return out, sign, weights


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _logsumexp(x, b, where, axes, keepdims, return_sign):
    out, sign, _ = _logsumexp_parts(x, b, where, axes, return_sign)
    return (
        _row_values(out, x.shape, axes, keepdims).astype(x.dtype),
        _row_values(sign, x.shape, axes, keepdims).astype(x.dtype),
    )


@_logsumexp.defjvp
def _logsumexp_jvp(axes, keepdims, return_sign, primals, tangents):
    x, b, where = primals
    dx, db, _ = tangents
    out, sign, weights = _logsumexp_parts(x, b, where, axes, return_sign)
    out = _row_values(out, x.shape, axes, keepdims).astype(x.dtype)
    sign = _row_values(sign, x.shape, axes, keepdims).astype(x.dtype)
    # Saved for reverse mode: the weights (the softmax without b), of the input's size and dtype.
    weights = _from_rows(weights, x.shape, axes).astype(x.dtype)
    tangent = _remat(_logsumexp_tangent, static_argnums=(4, 5))(weights, b, dx, db, axes, keepdims)
    return (out, sign), (tangent, jnp.zeros_like(sign))


def _logsumexp_tangent(weights, b, dx, db, axes, keepdims):
    cdt = nm.compute_dtype(weights.dtype)
    w, v = weights.astype(cdt), dx.astype(cdt)
    if b is not None:
        v = jnp.broadcast_to(b, v.shape).astype(cdt) * v + jnp.broadcast_to(db, v.shape).astype(cdt)
    return jnp.sum(w * v, axes, keepdims=keepdims).astype(weights.dtype)


# ------------------------------------------------------------------------------ complex inputs
# jax.nn takes complex inputs too. They get the plain formulas, differentiated by JAX, with the
# real part's max as the shift and this module's conventions for excluded entries and empty rows.


def _complex_shift(x, mask, axes):
    """The row max of the real part (0 where not finite), as a constant of x's dtype."""
    real = jnp.where(mask, jnp.real(x), -jnp.inf)
    m = lax.stop_gradient(jnp.max(real, axes, keepdims=True))
    return jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype)).astype(x.dtype)


def _complex_softmax(x, where, axes, log):
    mask = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(where, x.shape)
    m = _complex_shift(x, mask, axes)
    d = jnp.where(mask, x - m, -jnp.inf)
    e = jnp.exp(d)
    total = jnp.sum(e, axes, keepdims=True)
    some = total != 0
    total = jnp.where(some, total, jnp.ones((), total.dtype))
    if log:
        return jnp.where(mask & some, d - jnp.log(total), -jnp.inf).astype(x.dtype)
    return e / total


def _complex_logsumexp(x, b, where, axes, keepdims, return_sign):
    mask = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(where, x.shape)
    if b is not None:
        mask = mask & (jnp.broadcast_to(b, x.shape) != 0)
    m = _complex_shift(x, mask, axes)
    e = jnp.exp(jnp.where(mask, x - m, -jnp.inf))
    if b is not None:
        e = e * jnp.broadcast_to(b, x.shape)
    total = jnp.sum(e, axes, keepdims=True)
    size = jnp.abs(total)
    sign = total / jnp.where(size == 0, jnp.ones((), size.dtype), size).astype(total.dtype)
    out = jnp.log(size) + jnp.real(m) if return_sign else jnp.log(total) + m
    if not keepdims:
        out, sign = jnp.squeeze(out, axes), jnp.squeeze(sign, axes)
    return (out, sign) if return_sign else out


# ----------------------------------------------------------------------------- softmax_jacobian


def softmax_jacobian(x: ArrayLike, axis: int = -1) -> jax.Array:
    r"""The analytic Jacobian of :func:`softmax`: :math:`J_{ij} = a_i(\delta_{ij} - a_j)`.

    The diagonal uses :math:`1 - a_i = T/(1 + T)` at the max entries, so it keeps its relative
    accuracy when a row is confident. Equal to ``jax.jacfwd(softmax)`` row by row.

    .. math::

       J = \operatorname{diag}(a) - a a^\top, \qquad a = \mathrm{softmax}(x)

    Args:
      x: logits, shape ``[..., num_classes, ...]``; any floating dtype.
      axis: the class axis (an int).

    Returns:
      Shape ``x.shape`` with the class axis moved last plus one more class axis:
      ``[..., C, C]``, dtype of ``x``.

    Examples:
      >>> import jax.numpy as jnp, jsoftmax as jsm
      >>> jsm.softmax_jacobian(jnp.array([0.0, 0.0]))
      Array([[ 0.25, -0.25],
             [-0.25,  0.25]], dtype=float32)
    """
    x = val.inexact_array(x, "x", complex_ok=False)
    axis = val.class_axis(axis, x.shape, "x")
    z = jnp.moveaxis(nm.compute_logits(x, None), axis, -1)
    stats, d = nm.row_stats(z, -1, narrow=nm.narrow_dtype(x.dtype))
    a = jnp.exp(d) * (1 / stats.partition)
    # 1 - a_i: for any max entry (d == 0) it is T / (1 + T) exactly; below the max a_i <= 1/2
    # and the subtraction is benign.
    one_minus_a = jnp.where(d == 0, stats.T / stats.partition, 1 - a)
    outer = -a[..., :, None] * a[..., None, :]
    diag = a * one_minus_a
    num_classes = a.shape[-1]
    eye = jnp.eye(num_classes, dtype=bool).reshape((1,) * (a.ndim - 1) + (num_classes, num_classes))
    return jnp.where(eye, diag[..., :, None], outer).astype(x.dtype)
