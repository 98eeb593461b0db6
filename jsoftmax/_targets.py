r"""What the two cross-entropies share: argument parsing, targets, label look-ups, reductions.

The target of one example, after label smoothing :math:`\varepsilon` and the class mask, is

.. math::

   \tilde y_i = w_i \big((1 - \varepsilon)\, y_i + \tfrac{\varepsilon}{K} f_i\big),

where :math:`w_i` says whether class :math:`i` is included, :math:`f_i` whether it is included
*and* has a finite logit, and :math:`K = \sum_i f_i`. For integer labels :math:`y` is one-hot.

With ``axis_name`` the class axis is split over a mapped mesh axis: shard :math:`p` holds classes
``[p·C_local, (p+1)·C_local)``, integer labels are global, and ``K``, ``sum(y)`` and the label
look-up are combined with ``psum``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _numerics as nm
from . import _validation as val


class Options(NamedTuple):
    """The static options of a loss call (hashable: they are ``nondiff_argnums``)."""

    kind: str  # "int" (class ids) or "float" (target distribution)
    label_smoothing: float
    z_loss: float
    ignore_index: int | None
    axis_name: Hashable | None


class Call(NamedTuple):
    """A validated loss call with the class axis moved last."""

    logits: jax.Array  # [..., C], the caller's dtype
    labels: jax.Array  # int [...] or float [..., C]
    mask: jax.Array | None  # bool [..., C]
    options: Options
    reduction: str


def parse(
    logits: Any,
    labels: Any,
    *,
    axis: Any,
    where: Any,
    label_smoothing: Any,
    ignore_index: Any,
    z_loss: Any,
    reduction: Any,
    axis_name: Any,
) -> Call:
    """Validate a loss call at trace time and move the class axis last.

    ``axis`` may name several class axes (a tuple); they become one flattened class axis, in the
    order given, as optax flattens them: an integer label is a flat index into them.
    """
    logits = val.float_array(logits, "logits")
    axes = val.class_axes(axis, logits.shape, "logits")
    kind = val.label_kind(labels, logits.shape, axes)
    eps = val.static_float(label_smoothing, "label_smoothing", 0.0, 1.0)
    c = val.static_float(z_loss, "z_loss", 0.0)
    ignore_index = val.static_int_or_none(ignore_index, "ignore_index")
    if ignore_index is not None and kind == "float":
        raise ValueError("ignore_index: applies to integer labels only; got float labels")
    labels = jnp.asarray(labels)
    if kind == "int":
        val.ignore_index_fits(ignore_index, labels.dtype)
        labels = val.integer_labels(labels)
    reduction = val.reduction(reduction)
    mask = val.where_mask(where, logits.shape)
    val.axis_name_bound(axis_name)
    if axis_name is not None and len(axes) > 1:
        raise ValueError(
            f"axis: one class axis is split over axis_name {axis_name!r}; got the class axes {axes}"
        )
    logits = classes_last(logits, axes)
    if mask is not None:
        mask = classes_last(mask, axes)
    if kind == "float":
        labels = classes_last(labels, axes)
    options = Options(kind, eps, c, ignore_index, axis_name)
    return Call(logits, labels, mask, options, reduction)


def classes_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``x`` with the class ``axes`` moved last, in their order, and flattened into one."""
    if len(axes) == 1:
        return jnp.moveaxis(x, axes[0], -1)
    batch = [i for i in range(x.ndim) if i not in axes]
    moved = jnp.transpose(x, batch + list(axes))
    return moved.reshape(moved.shape[: len(batch)] + (-1,))


# ----------------------------------------------------------------------------- class axis split


def class_offset(num_local: int, axis_name) -> jax.Array | int:
    """Index of this shard's first class (0 when the class axis is not split)."""
    return 0 if axis_name is None else lax.axis_index(axis_name) * num_local


def num_classes(num_local: int, axis_name) -> int:
    return num_local if axis_name is None else num_local * lax.axis_size(axis_name)


def lookup(x: jax.Array, labels: jax.Array, axis_name) -> jax.Array:
    """``x[..., label]`` with the class axis last, shape ``[..., 1]``; from the owning shard.

    ``labels`` must be in range (callers pass labels made safe); with ``axis_name`` the shards
    that do not own the label contribute 0 to a ``psum``.
    """
    num_local = x.shape[-1]
    local = labels - class_offset(num_local, axis_name)
    idx = jnp.clip(local, 0, num_local - 1)[..., None]
    picked = jnp.take_along_axis(x, idx, axis=-1)
    if axis_name is None:
        return picked
    owned = ((local >= 0) & (local < num_local))[..., None]
    zero = jnp.zeros((), picked.dtype)
    return lax.psum(jnp.where(owned, picked, zero), axis_name)


class IntLabels(NamedTuple):
    """Integer labels sorted into ignored, in-contract and bad examples (shape ``[..., 1]``)."""

    safe: jax.Array  # the label, or 0 where ignored: always a valid index to gather at
    ignored: jax.Array  # label == ignore_index
    bad: jax.Array  # out of [0, C) or on an excluded class, and not ignored


def int_labels(labels: jax.Array, mask: jax.Array | None, options: Options, num_local: int):
    labels = labels[..., None]
    if options.ignore_index is None:
        ignored = jnp.zeros(labels.shape, bool)
    else:
        ignored = labels == options.ignore_index
    in_range = (labels >= 0) & (labels < num_classes(num_local, options.axis_name))
    safe = jnp.where(ignored | ~in_range, 0, labels)
    ok = in_range
    if mask is not None:
        on_included = lookup(mask.astype(jnp.int32), safe[..., 0], options.axis_name) > 0
        ok = ok & on_included
    return IntLabels(safe[..., 0], ignored, ~ok & ~ignored)


def smoothing_support(z: jax.Array, axis_name) -> tuple[jax.Array, jax.Array]:
    """``f`` (included and finite, as 0/1 in z's dtype) and ``K = sum(f)`` (at least 1)."""
    f = jnp.isfinite(z).astype(z.dtype)  # excluded entries are already -inf in z
    k = nm.psum(jnp.sum(f, -1, keepdims=True), axis_name)
    return f, jnp.maximum(k, 1)


def dense_target(
    z: jax.Array, labels: jax.Array, mask: jax.Array | None, options: Options, safe_labels=None
) -> jax.Array:
    r"""The target :math:`\tilde y` as a ``[..., C]`` array in z's dtype."""
    if options.kind == "int":
        local = safe_labels - class_offset(z.shape[-1], options.axis_name)
        y = jax.nn.one_hot(local, z.shape[-1], dtype=z.dtype)  # all-zero off the owning shard
    else:
        y = labels.astype(z.dtype)
        if mask is not None:
            y = jnp.where(mask, y, jnp.zeros((), y.dtype))
    eps = options.label_smoothing
    if eps > 0:
        f, k = smoothing_support(z, options.axis_name)
        y = (1 - eps) * y + (eps / k) * f
    return y


def reduce(loss: jax.Array, call: Call, ignored: jax.Array | None) -> jax.Array:
    """Apply the reduction; the mean skips ignored examples and is 0 when there are none."""
    if call.reduction == "none":
        return loss
    total = jnp.sum(loss)
    if call.reduction == "sum":
        return total
    if ignored is None:
        count = jnp.asarray(loss.size, loss.dtype)
    else:
        count = jnp.sum(~ignored).astype(loss.dtype)
    return total / jnp.maximum(count, 1)


def finish_rows(loss, nonempty, labels: IntLabels | None):
    """Per-example loss with the contract's edge cases; every argument has shape ``[..., 1]``.

    Empty rows give 0, ignored examples give 0, bad labels give NaN (in their row only).
    """
    zero = jnp.zeros((), loss.dtype)
    loss = jnp.where(nonempty, loss, zero)
    if labels is not None:
        loss = jnp.where(labels.ignored, zero, loss)
        # Multiplying (not selecting) makes the gradient of a bad row NaN as well.
        loss = loss * jnp.where(labels.bad & nonempty, jnp.nan, 1).astype(loss.dtype)
    return loss[..., 0]
