"""Value checks on integer labels, as checkify errors rather than host syncs."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.typing import ArrayLike

from . import _validation as val


def check_labels(labels: ArrayLike, num_classes: int, ignore_index: int | None = None) -> jax.Array:
    r"""Check that integer labels lie in ``[0, num_classes)`` (or equal ``ignore_index``).

    The losses answer a bad label with NaN in its example only; call this to get an error
    instead. It uses :func:`jax.experimental.checkify.check`: called eagerly, a bad label raises
    at once; under ``jit``, wrap the caller in ``checkify.checkify(...)`` and the returned error
    says the same. Good labels pass through unchanged.

    .. math::

       0 \le y < C \quad\text{or}\quad y = \texttt{ignore\_index}

    Args:
      labels: integer class ids, any shape.
      num_classes: :math:`C`, a static positive int.
      ignore_index: an optional static int that is always accepted.

    Returns:
      ``labels``, unchanged.

    Examples:
      >>> import jax, jax.numpy as jnp, jsoftmax as jsm
      >>> from jax.experimental import checkify
      >>> jsm.check_labels(jnp.array([0, 2, -100]), 3, ignore_index=-100)
      Array([   0,    2, -100], dtype=int32)
      >>> f = checkify.checkify(jax.jit(lambda y: jsm.check_labels(y, 3)))
      >>> err, _ = f(jnp.array([0, 5]))
      >>> print(err.get())  # doctest: +ELLIPSIS
      labels: 1 label(s) outside [0, 3); first bad label 5 at flat index 1...
    """
    dtype = getattr(labels, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        name = getattr(dtype, "name", type(labels).__name__)
        raise TypeError(f"labels: expected an integer array, got {name}")
    if not isinstance(num_classes, jax.core.Tracer) and (
        isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, numbers.Integral)
    ):
        raise TypeError(
            f"num_classes: expected a positive int, got {type(num_classes).__name__} "
            f"{num_classes!r}"
        )
    num_classes = val.static_int_or_none(num_classes, "num_classes")  # refuses a traced value
    if num_classes <= 0:
        raise ValueError(f"num_classes: must be a positive int, got {num_classes!r}")
    ignore_index = val.static_int_or_none(ignore_index, "ignore_index")
    labels = jnp.asarray(labels)
    val.ignore_index_fits(ignore_index, labels.dtype)
    # Compare in at least 32 bits: int8 labels against num_classes=300 must not wrap.
    flat = val.integer_labels(labels).reshape(-1)
    bad = flat < 0
    if num_classes <= jnp.iinfo(flat.dtype).max:  # else no label of this dtype is too large
        bad = bad | (flat >= num_classes)
    if ignore_index is not None:
        bad = bad & (flat != ignore_index)
    count = jnp.sum(bad)
    # flat index of the first bad label (0 when there is none, or no label at all)
    first = jnp.argmax(bad) if flat.size else jnp.zeros((), jnp.int32)
    allowed = "" if ignore_index is None else f" and not ignore_index={ignore_index}"
    checkify.check(
        count == 0,
        f"labels: {{count}} label(s) outside [0, {num_classes}){allowed}; "
        "first bad label {value} at flat index {index}",
        count=count,
        value=flat[first] if flat.size else jnp.zeros((), flat.dtype),
        index=first,
    )
    return labels
