"""Argument checks, run at trace time.

Every check looks only at shapes, dtypes and static Python options, so it runs once while JAX
traces and costs nothing at run time. Value checks (is a label in range?) belong to
:func:`jsoftmax.check_labels`, never to a host sync inside a function.

Messages start with the argument's name, so the first word of a traceback points at the cause.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "sum", "mean")


def is_float_dtype(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def float_array(x: Any, name: str) -> jax.Array:
    """``x`` as an array of a real floating dtype, or a TypeError naming ``name``."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Real, list, tuple)):
            raise TypeError(f"{name}: expected a floating-point array, got {type(x).__name__}")
        x = jnp.asarray(x)
        if not is_float_dtype(x.dtype):
            x = x.astype(jnp.result_type(float))
        return x
    if not is_float_dtype(dtype):
        raise TypeError(
            f"{name}: expected a floating-point dtype (float16, bfloat16, float32, float64), "
            f"got {np.dtype(dtype).name}"
        )
    return jnp.asarray(x)


def inexact_array(x: Any, name: str, complex_ok: bool = True) -> jax.Array:
    """``x`` as a floating (or complex) array, as :mod:`jax.nn` takes it.

    Integer inputs are converted as ``jax.nn`` converts them (to float32, or float64 for 64-bit
    integers); booleans, strings and other objects are a TypeError naming ``name``.
    """
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Number, list, tuple)):
            raise TypeError(f"{name}: expected a floating-point array, got {type(x).__name__}")
        x = jnp.asarray(x)
        dtype = x.dtype
    if jnp.issubdtype(dtype, jnp.integer):
        x = jnp.asarray(x)  # 64-bit integers become 32-bit ones without x64
        return x.astype(jnp.float64 if jnp.iinfo(x.dtype).bits == 64 else jnp.float32)
    if is_float_dtype(dtype) or (complex_ok and jnp.issubdtype(dtype, jnp.complexfloating)):
        return jnp.asarray(x)
    raise TypeError(
        f"{name}: expected a floating-point dtype (float16, bfloat16, float32, float64), "
        f"got {np.dtype(dtype).name}"
    )


def _one_axis(axis: Any, ndim: int, name: str) -> int:
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(
            f"{name}: expected an int, a tuple of ints or None, got {type(axis).__name__} {axis!r}"
        )
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: {axis} is out of range for an array of rank {ndim}")
    return axis % ndim


def canonical_axes(axis: Any, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """``axis`` (an int, a tuple or list of ints, or None for all) as non-negative ints in
    ``[0, ndim)``, in the order given; a repeated axis is a ValueError."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        axes = tuple(_one_axis(a, ndim, name) for a in axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"{name}: repeated axis in {tuple(axis)!r}")
        return axes
    return (_one_axis(axis, ndim, name),)


def canonical_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """``axis`` as a non-negative int in ``[0, ndim)``."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (numbers.Integral,)):
        raise TypeError(f"{name}: expected an int, got {type(axis).__name__} {axis!r}")
    axis = int(axis)
    if ndim == 0:
        raise ValueError(f"{name}: the input is a scalar, it has no class axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: {axis} is out of range for an array of rank {ndim}")
    return axis % ndim


def class_axis(axis: Any, shape: tuple[int, ...], name: str) -> int:
    """``axis`` of the array ``name`` as a non-negative int; the axis must exist and be nonempty.

    A scalar or a class axis of size 0 is the array's fault and names ``name``; an axis out of
    range names ``axis``.
    """
    if len(shape) == 0:
        raise ValueError(f"{name}: expected an array with a class axis, got a scalar")
    axis = canonical_axis(axis, len(shape))
    if shape[axis] == 0:
        raise ValueError(
            f"{name}: the class axis (axis {axis} of shape {tuple(shape)}) has size 0; "
            "a softmax needs at least one class"
        )
    return axis


def class_axes(axis: Any, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """The class axes of the array ``name`` (an int, a tuple of ints, or None for all), as
    non-negative ints in the order given. Several axes are one flattened class axis, as in optax;
    together they must hold at least one class.
    """
    if len(shape) == 0:
        raise ValueError(f"{name}: expected an array with a class axis, got a scalar")
    axes = canonical_axes(axis, len(shape))
    if not axes:
        raise ValueError("axis: expected at least one class axis, got ()")
    if math.prod(shape[a] for a in axes) == 0:
        where = f"axis {axes[0]}" if len(axes) == 1 else f"axes {axes}"
        raise ValueError(
            f"{name}: the class axis ({where} of shape {tuple(shape)}) has size 0; "
            "a softmax needs at least one class"
        )
    return axes


def bool_array(where: Any, name: str = "where") -> jax.Array:
    """``where`` as a boolean array (not broadcast), or a TypeError naming ``name``."""
    dtype = getattr(where, "dtype", None)
    if dtype is None:
        where = jnp.asarray(where)
        dtype = where.dtype
    if dtype != jnp.bool_:
        raise TypeError(f"{name}: expected a boolean array, got dtype {np.dtype(dtype).name}")
    return jnp.asarray(where)


def broadcast_shape(shape: tuple[int, ...], other: Any, name: str, what: str) -> tuple[int, ...]:
    """The broadcast of ``shape`` with the shape of argument ``name`` (numpy rules), or a
    ValueError naming ``name``; ``what`` says whose shape ``shape`` is."""
    oshape = tuple(np.shape(other))
    try:
        return tuple(np.broadcast_shapes(tuple(shape), oshape))
    except ValueError:
        raise ValueError(
            f"{name}: shape {oshape} does not broadcast with {what} shape {tuple(shape)}"
        ) from None


def where_mask(where: Any, shape: tuple[int, ...], name: str = "where") -> jax.Array | None:
    """``where`` broadcast to ``shape`` as a boolean array, or None."""
    if where is None:
        return None
    where = bool_array(where, name)
    wshape = tuple(np.shape(where))
    try:
        out = np.broadcast_shapes(wshape, shape)
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(f"{name}: shape {wshape} does not broadcast to the input's shape {shape}")
    return jnp.broadcast_to(where, shape)


def static_float(value: Any, name: str, low: float, high: float | None = None) -> float:
    """A static option in ``[low, high)`` (or ``[low, inf)``) as a Python float."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name}: must be a static Python number, got a traced value; mark it static "
            "(e.g. jax.jit(..., static_argnames=...)) or close over it"
        )
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}") from None
    if not np.isfinite(value) or value < low or (high is not None and value >= high):
        interval = f"[{low:g}, {high:g})" if high is not None else f"[{low:g}, inf)"
        raise ValueError(f"{name}: must lie in {interval}, got {value!r}")
    return value


def reduction(value: Any) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction: must be one of {REDUCTIONS}, got {value!r}")
    return value


def static_int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name}: must be a static Python int, got a traced value")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int or None, got {type(value).__name__} {value!r}")
    return int(value)


def label_kind(labels: Any, logits_shape: tuple[int, ...], axes: tuple[int, ...]) -> str:
    """``"int"`` for class ids, ``"float"`` for a target distribution; else an error.

    ``axes``: the class axes of the logits (``class_axes``)."""
    dtype = getattr(labels, "dtype", None)
    if dtype is None and isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        dtype = jnp.asarray(labels).dtype  # a Python int is a 0-d class id (ArrayLike)
    if dtype is None:
        raise TypeError(f"labels: expected an array, got {type(labels).__name__}")
    shape = tuple(np.shape(labels))
    int_shape = tuple(n for i, n in enumerate(logits_shape) if i not in axes)
    if jnp.issubdtype(dtype, jnp.integer):
        if shape != int_shape:
            raise ValueError(
                f"labels: integer labels must have the logits' shape without the class "
                f"axis{'es' if len(axes) > 1 else ''}, {int_shape}, got {shape}"
            )
        return "int"
    if is_float_dtype(dtype):
        if shape != tuple(logits_shape):
            raise ValueError(
                f"labels: float labels must have the logits' shape {tuple(logits_shape)}, "
                f"got {shape}"
            )
        return "float"
    raise TypeError(
        f"labels: expected integer class ids or a float target distribution, "
        f"got dtype {np.dtype(dtype).name}"
    )


def integer_labels(labels: jax.Array) -> jax.Array:
    """Integer labels at least 32 bits wide, so that comparing them with a class count cannot wrap.

    ``int8`` labels compared with ``C = 300`` would convert 300 to ``int8`` (44) first.
    """
    labels = jnp.asarray(labels)
    if jnp.iinfo(labels.dtype).bits < 32:
        labels = labels.astype(jnp.int32)
    return labels


def ignore_index_fits(ignore_index: int | None, dtype: Any) -> None:
    """A ValueError naming ``ignore_index`` when no label of ``dtype`` can equal it.

    Comparing ``uint8`` labels with ``-100`` would wrap ``-100`` to 156 and silently ignore
    every label 156; a value out of the dtype's range is a mistake, not a no-op.
    """
    if ignore_index is None:
        return
    info = jnp.iinfo(jax.dtypes.canonicalize_dtype(dtype))
    if not info.min <= ignore_index <= info.max:
        raise ValueError(
            f"ignore_index: {ignore_index} cannot be represented in the labels' dtype "
            f"{np.dtype(info.dtype).name} (range [{info.min}, {info.max}]), so no label can "
            "equal it"
        )


def axis_name_bound(axis_name: Any) -> None:
    """Raise a ValueError naming ``axis_name`` when it is not bound by an enclosing map."""
    if axis_name is None:
        return
    try:
        jax.lax.axis_size(axis_name)
    except (NameError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"axis_name: {axis_name!r} is not bound; call inside jax.shard_map (or vmap/pmap) "
            f"over a mesh axis of that name ({err})"
        ) from None
