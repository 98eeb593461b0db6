r"""optax's softmax cross-entropies under their own names, computed by the fused loss.

``optax.losses.softmax_cross_entropy`` and
``optax.losses.softmax_cross_entropy_with_integer_labels`` with the same arguments and meaning
(``axis`` tuples flattened into one class axis, a ``where`` of lower rank as a per-example mask,
the result dtype), so that replacing ``optax.losses.`` by ``jsm.`` changes the accuracy and the
memory and nothing else a correct program relies on. Underneath is
:func:`jsoftmax.fused_cross_entropy` with reduction ``"none"``: a ``jax.custom_vjp`` that keeps
no ``[rows, classes]`` array between the passes.

Where optax's answer is an accident of its formulation, these keep the library's conventions
(listed in the docs): ``0 · log 0 = 0`` for a zero target on a ``-inf`` logit (optax: NaN), an
integer label outside ``[0, C)`` or on a class excluded by ``where`` gives NaN for its example
(optax: a negative label wraps around, and a label on an excluded class gives a finite, even
negative, loss), and a ``+inf`` logit gives NaN (optax's integer-label loss: ``+inf``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from . import _fused
from . import _validation as val


def _per_example_where(where, logits_ndim: int, axes: tuple[int, ...]):
    """optax's rule: a ``where`` of lower rank than the logits is a per-example mask, with the
    class axes inserted (as size 1) at ``axes``."""
    if where is None:
        return None
    where = val.bool_array(where)
    if where.ndim != logits_ndim:
        if where.ndim + len(axes) != logits_ndim:
            raise ValueError(
                f"where: shape {tuple(where.shape)} is neither the logits' rank nor a per-example "
                f"mask (the logits' rank {logits_ndim} without the {len(axes)} class axes)"
            )
        where = jnp.expand_dims(where, axes)
    return where


def _result_dtype(*dtypes):
    # optax's result dtype is what its arithmetic promotes to. Decided by JAX's standard rules
    # even under strict promotion, so that mixed dtypes are answered rather than refused.
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*dtypes)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with a target distribution, as ``optax.softmax_cross_entropy``.

    .. math::

       \ell = -\sum_i y_i \log \mathrm{softmax}(z)_i

    computed by :func:`jsoftmax.fused_cross_entropy` (a ``custom_vjp``: reverse mode only; use
    :func:`jsoftmax.cross_entropy` for forward mode).

    Args:
      logits: unnormalized log-probabilities, shape ``[..., num_classes]`` (class axes
        ``axis``); float dtype.
      labels: target distributions (need not sum to 1), broadcastable with ``logits``; an
        integer or boolean one-hot array is taken as floats, as optax's arithmetic takes it.
        Differentiable.
      axis: the class axis, a tuple of class axes (one flattened class axis), or None (all).
      where: optional boolean mask of the logits' shape (the classes that take part), or of
        lower rank: a per-example mask, the class axes inserted at ``axis`` as optax does.

    Returns:
      Per-example losses, the shape of ``logits`` without the class axes, in the dtype optax
      gives (the promotion of the logits' and the labels' dtypes); computed in float32 at least.
      An example with nothing included gives 0.

    Examples:
      >>> import jax.numpy as jnp, jsoftmax as jsm
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(jsm.softmax_cross_entropy(logits, labels))
      [0.2761297 2.951799 ]
      >>> print(jsm.softmax_cross_entropy(logits, labels, where=jnp.array([True, False])))
      [0.2761297 0.       ]
    """
    logits = val.float_array(logits, "logits")
    dtype = getattr(labels, "dtype", None)
    if dtype is None:
        if not isinstance(labels, (np.ndarray, list, tuple, float, int)):
            raise TypeError(f"labels: expected an array, got {type(labels).__name__}")
        labels = jnp.asarray(labels)
        dtype = labels.dtype
    if not (jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_) or jnp.issubdtype(
        dtype, jnp.complexfloating
    ):
        raise TypeError(
            f"labels: expected a float target distribution, got dtype {np.dtype(dtype).name}"
        )
    labels = jnp.asarray(labels)
    if val.is_float_dtype(dtype):
        out_dtype = _result_dtype(logits.dtype, labels.dtype)
    else:  # optax's arithmetic takes integer or boolean targets as the logits' dtype
        out_dtype = logits.dtype
        labels = labels.astype(logits.dtype)
    shape = val.broadcast_shape(logits.shape, labels, "labels", "the logits'")
    logits, labels = jnp.broadcast_to(logits, shape), jnp.broadcast_to(labels, shape)
    axes = val.canonical_axes(axis, len(shape))
    where = _per_example_where(where, len(shape), axes)
    if math.prod(shape[a] for a in axes) == 0 or not axes:
        # No class to sum over: optax's sum is 0.
        return jnp.zeros(tuple(n for i, n in enumerate(shape) if i not in axes), out_dtype)
    loss = _fused.fused_cross_entropy(logits, labels, axes, where)
    return loss.astype(out_dtype)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with integer class ids, as
    ``optax.softmax_cross_entropy_with_integer_labels``.

    .. math::

       \ell = \log \sum_j e^{z_j} - z_y

    computed by :func:`jsoftmax.fused_cross_entropy` (a ``custom_vjp``: reverse mode only).

    Args:
      logits: unnormalized log-probabilities, shape ``[..., num_classes]`` (class axes
        ``axis``); float dtype.
      labels: integer class ids, the shape of ``logits`` without the class axes; with several
        class axes, a flat index into them (in the order of ``axis``), as in optax.
      axis: the class axis or a tuple of class axes.
      where: optional boolean mask of the logits' shape (the classes that take part), or of
        lower rank: a per-example mask, the class axes inserted at ``axis`` as optax does.

    Returns:
      Per-example losses, the shape of ``labels``, in the logits' dtype (as optax), computed in
      float32 at least. An example with nothing included gives 0; a label outside
      ``[0, num_classes)`` or on an excluded class gives NaN (``jsm.check_labels`` raises
      instead).

    Examples:
      >>> import jax.numpy as jnp, jsoftmax as jsm
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> print(jsm.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])))
      [0.2761297 2.951799 ]
      >>> logits = jnp.arange(24.0).reshape(1, 2, 3, 4)
      >>> labels = jnp.array([[5, 11]])  # flat indices into the [3, 4] classes
      >>> print(jsm.softmax_cross_entropy_with_integer_labels(logits, labels, axis=(2, 3)))
      [[6.458669 0.458669]]
    """
    logits = val.float_array(logits, "logits")
    dtype = getattr(labels, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        name = np.dtype(dtype).name if dtype is not None else type(labels).__name__
        raise TypeError(f"labels: expected integer class ids, got {name}")
    if axis is None or not isinstance(axis, (int, np.integer, tuple)):
        raise TypeError(f"axis: expected an int or a tuple of ints, got {type(axis).__name__}")
    axes = val.canonical_axes(axis, logits.ndim)
    where = _per_example_where(where, logits.ndim, axes)
    if math.prod(logits.shape[a] for a in axes) == 0:
        # No class at all: every label is outside [0, 0).
        return jnp.full(jnp.shape(labels), jnp.nan, logits.dtype)
    return _fused.fused_cross_entropy(logits, labels, axes, where).astype(logits.dtype)
