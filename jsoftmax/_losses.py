r"""The reference cross-entropy: the definition, differentiated by JAX's own autodiff.

:func:`cross_entropy` writes the loss exactly as its formula reads: build the target
distribution, take the accurate log-softmax, contract. No custom rule is involved, so every
transformation works on it (``grad``, ``jacrev``, ``jacfwd``, ``jvp``, ``hessian``), and it is the
oracle the fused loss is checked against.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _numerics as nm
from . import _sharding as sh
from . import _targets as tg


def cross_entropy(
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
    r"""Softmax cross-entropy, the reference definition (plain autodiff).

    For one example with logits :math:`z`, target :math:`\tilde y` (labels after label smoothing
    and the class mask, see below) and log-probabilities :math:`\log a = \mathrm{log\_softmax}(z)`:

    .. math::

       \ell = -\sum_i \tilde y_i \log a_i + c \, \big(\log\textstyle\sum_i e^{z_i}\big)^2,
       \qquad \tilde y_i = w_i\big((1-\varepsilon) y_i + \tfrac{\varepsilon}{K} f_i\big)

    where :math:`w_i` marks included classes, :math:`f_i` included classes with a finite logit,
    :math:`K = \sum_i f_i`, :math:`\varepsilon` is ``label_smoothing`` and :math:`c` is ``z_loss``.
    ``0 · log 0 = 0``; a positive target on an included ``-inf`` logit gives ``+inf``.

    Args:
      logits: unnormalized log-probabilities, shape ``[..., num_classes, ...]`` (class axis
        ``axis``); 16-bit inputs are computed in float32.
      labels: either integer class ids with the shape of ``logits`` without the class axis, or
        a float target distribution with the shape of ``logits`` (need not sum to 1).
      axis: the class axis, or a tuple of class axes: several axes are one flattened class
        axis (in the order given, as optax flattens them; integer labels index it), and None is
        all axes.
      where: optional boolean mask broadcastable to ``logits``: the classes that take part.
      label_smoothing: :math:`\varepsilon \in [0, 1)`.
      ignore_index: integer labels equal to it give loss 0 and gradient 0 and are left out of
        the mean.
      z_loss: :math:`c \ge 0`, the weight of PaLM's auxiliary loss.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over examples that are not ignored; 0 when
        all are).
      axis_name: inside ``jax.shard_map``, the mesh axis over which the class axis is split.

    Returns:
      ``"none"``: per-example losses, the shape of ``logits`` without the class axis; otherwise
      a scalar. float32 for 16-bit logits, else the logits' dtype. An integer label outside
      ``[0, C)`` or on an excluded class gives NaN for that example only; a row with nothing
      included gives 0.

    Examples:
      >>> import jax.numpy as jnp, jsoftmax as jsm
      >>> logits = jnp.array([[4.0, -4.0, 3.0], [20.0, 0.0, 0.0]])
      >>> loss = jsm.cross_entropy(logits, jnp.array([2, 0]))
      >>> print(f"{float(loss[0]):.7f} {float(loss[1]):.4e}")
      1.3135068 4.1223e-09
      >>> soft = jnp.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
      >>> print(f"{float(jsm.cross_entropy(logits, soft, reduction='sum')):.4f}")
      4.8135

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022 (z-loss). Szegedy et al., `Rethinking the
      Inception Architecture <https://arxiv.org/abs/1512.00567>`_, 2016 (label smoothing).
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
        return sh.vocab_parallel(cross_entropy, call)
    opts = call.options
    z = nm.compute_logits(call.logits, call.mask)
    stats, d = nm.row_stats(z, -1, opts.axis_name, nm.narrow_dtype(call.logits.dtype))
    nll = stats.log_z - d  # -log_softmax: +inf on excluded and -inf entries
    ints = None
    if opts.kind == "int":
        ints = tg.int_labels(call.labels, call.mask, opts, z.shape[-1])
        y = tg.dense_target(z, None, None, opts, safe_labels=ints.safe)
    else:
        y = tg.dense_target(z, call.labels, call.mask, opts)
    # 0 * log 0 = 0: drop +inf terms whose weight is 0 (keeps the label gradient elsewhere).
    # A row with nothing included contributes nothing: its nll is all +inf, and the label
    # gradient would be 0 * inf = NaN.
    drop = ((y == 0) & (nll == jnp.inf)) | ~stats.nonempty
    nll = jnp.where(drop, jnp.zeros((), nll.dtype), nll)
    loss = nm.psum(jnp.sum(y * nll, -1, keepdims=True), opts.axis_name)
    if opts.z_loss > 0:
        lse = jnp.where(stats.nonempty, stats.lse, jnp.zeros((), z.dtype))
        # (sqrt(c)·lse)², not c·lse²: lse² can overflow where the product does not, and a c
        # below float32's range would give 0 · inf = NaN.
        loss = loss + (math.sqrt(opts.z_loss) * lse) ** 2
    loss = tg.finish_rows(loss, stats.nonempty, ints)
    return tg.reduce(loss, call, None if ints is None else ints.ignored[..., 0])
