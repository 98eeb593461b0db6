r"""Linear head + cross-entropy without materializing the ``[tokens, vocab]`` logits.

A language model's last layer projects hidden states ``x: [N, D]`` onto a vocabulary
``w: [D, V]`` and feeds the logits to a softmax cross-entropy. Written naively, the logits and
their gradient are two ``[N, V]`` float32 arrays, which for ``N = 8192`` tokens and
``V = 32768`` words is 2 GiB of temporaries for a result that is one number.
:func:`linear_cross_entropy` computes the same value and the same gradients with respect to
``x``, ``w`` and ``bias`` while holding one ``[chunk, V]`` block of logits at a time.

Design
------
The tokens are cut into chunks of ``chunk_size`` rows (the last chunk is padded with rows of
weight zero) and a :func:`jax.lax.scan` walks over them. Each step forms the chunk's logits
``z = x_c @ w + bias`` (accumulated in float32), optionally soft-capped, reduces them to four
numbers per row and, when gradients are wanted, turns them straight into the gradient of the
loss with respect to ``z``. Nothing of size ``N x V`` ever exists, in the forward pass or the
backward.

The reduction decides what the backward pass needs:

* ``"mean"`` and ``"sum"``: the cotangent of the loss is one scalar ``g``, so the gradients are
  computed *in the forward pass*: per chunk, ``dz`` gives ``dx_c = dz @ wᵀ`` (stored) and
  ``dw += x_cᵀ @ dz`` (a float32 accumulator carried through the scan). The backward pass only
  multiplies the stored ``dx``, ``dw`` and ``dbias`` by ``g``. The whole ``value_and_grad``
  costs the same three matmuls as the naive path. When the function is called without a
  gradient, JAX runs the plain primal, which does one matmul per chunk and no more.
* ``"none"``: every row has its own cotangent, which is known only in the backward pass. The
  forward saves the per-row statistics (a few floats a row) and the backward recomputes each
  chunk's logits: four matmuls in all, still one chunk of logits at a time.

Numerics
--------
Per row, with ``m`` the row max, ``t`` the number of entries equal to ``m`` and ``s`` the sum of
``exp(z - m)`` over the entries *strictly below* ``m``:

.. math::

   \operatorname{lse}(z) = m + \operatorname{log1p}\big((t - 1) + s\big), \qquad
   \ell = \operatorname{log1p}\big((t - 1) + s\big) - (z_y - m), \qquad
   \frac{\partial \ell}{\partial z_y} = \frac{(e^{z_y - m} - t) - s}{t + s}.

Leaving the max entries out of ``s`` keeps a confident row (``t = 1``, tiny ``s``) exact:
``log1p(s)`` and ``-s / (1 + s)`` keep full relative accuracy where ``log(1 + s)`` and
``softmax - 1`` would round to zero. The split is arithmetic, not a select: with
``e = exp(z - m)``, ``floor(e)`` is 1 at the max and 0 below it, so ``t = sum(floor(e))`` and
``s = sum(e - floor(e))``. Both sums (and the label-smoothing sums) are one multi-operand
``lax.reduce``, a single loop over the block on XLA:CPU that reads only ``e``.

This needs ``z - m`` to be exactly 0 at the max, yet XLA recomputes cheap elementwise producers
inside every consumer fusion. The logits are therefore kept as ``scale * v`` with ``v`` a
materialized array (``x @ w + bias``, or ``tanh(u / c)`` under a softcap ``c``) and shifted as
``(v - max v) * scale``: a subtraction of two stored numbers, which no FMA contraction can
perturb (``c * v - m`` could become one FMA in one fusion and not in another). Testing
``floor(e)`` rather than ``z == m`` is a second guard: a max entry a few ulps off still has
``e == 1``; and empty rows are recognized by ``m = -inf``, never by ``t = 0``.

Vocabulary shards
-----------------
With ``axis_name`` (inside :func:`jax.shard_map`, ``w`` and ``bias`` split along V), the
statistics are combined in :func:`_row_stats` and nowhere else: the row max is a ``pmax``;
``s``, ``t``, the label's logit (read on the shard that owns it, 0 elsewhere) and the
label-smoothing sums are ``psum`` s of shard-local values taken against the global max, so no
rescaling is needed. That is ``O(chunk)`` numbers per step; the vocabulary is never gathered.
Smoothing and z-loss use the global class count and logsumexp. In the backward pass each shard
forms ``dw`` and ``dbias`` for its own columns and a partial ``dx``, which is summed over
``axis_name`` (by a ``psum`` here under ``check_vma=True``, by shard_map's own transpose
with ``check_vma=False``).

Chunk size
----------
``chunk_size=None`` takes ``rows = 2**floor(log2(2**23 / V))``, clipped to ``[64, 1024]``: one
``[rows, V]`` float32 block of logits is about 32 MiB, near the size of a server CPU's
last-level cache (:func:`default_chunk_size`). Smaller chunks pay for more passes over the
``[D, V]`` accumulator (one per chunk) and smaller matmuls; larger ones fall out of cache and
cost memory. On a 2-core CPU at N=2048, D=256, V=32768, 128 to 512 rows timed within noise of
each other and 64 was slower (``experiments/bench_linear.py --chunks``). D does not enter the
rule: the accumulator update is 1/rows of a chunk's matmul work at any D, and the logit block,
which sets the memory, does not depend on D. When N is not a multiple, the chunks are balanced
(``ceil(N / ceil(N / rows))`` rows, rounded up to a multiple of 8), so padding wastes at most 7
rows per chunk. Peak temporary memory of a ``value_and_grad`` is then about ``4·D·V`` bytes
(the ``dw`` accumulator) plus a logit block, whatever N.

The vocabulary is not blocked within a chunk: forming ``dz`` in the same pass as the loss needs
the row's full logsumexp first, and a second pass over vocabulary blocks would cost a fourth
matmul. With the 64-row floor a chunk of a 256k vocabulary is a 64 MiB block.

dtype
-----
16-bit ``x`` and ``w`` stay 16-bit in the matmuls, which accumulate in float32
(``preferred_element_type``). The statistics, the loss and the ``dw``/``dbias`` accumulators are
float32; ``dz`` is rounded to the inputs' dtype for the two gradient matmuls (what autodiff of
16-bit logits does), and each gradient comes back in its input's dtype.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from . import _numerics as nm
from . import _sharding as sh
from . import _validation as val

Array = jax.Array

_REDUCTIONS = ("none", "sum", "mean")
# One [chunk, V] float32 block of logits holds about this many elements (32 MiB).
_LOGIT_BLOCK_ELEMENTS = 1 << 23
_MIN_CHUNK, _MAX_CHUNK = 64, 1024


class _Options(NamedTuple):
    """Static configuration of the chunked kernel (hashable, for ``nondiff_argnums``)."""

    label_smoothing: float
    z_loss: float
    softcap: float | None
    axis_name: object
    sum_rows: bool  # True: return the weighted sum of the rows ("sum"/"mean"); False: the rows.


class _Stats(NamedTuple):
    """Per-row statistics of one chunk of logits (shape [C, 1]), global over ``axis_name``."""

    m: Array  # row max of v (0 for a row of -inf logits); the logits' max is scale * m
    nonempty: Array  # the row has a logit above -inf
    t: Array  # number of entries at the max
    s: Array  # sum of exp(z - max) over the entries below the max
    dy: Array  # z_label - max
    sd: Array | None  # sum of the finite (z - m); label smoothing only
    k: Array | None  # number of finite logits (at least 1); label smoothing only


def default_chunk_size(num_tokens: int, vocab: int) -> int:
    """The rows per chunk that ``chunk_size=None`` uses (the rule in the module docstring).

    Args:
      num_tokens: N, the number of rows of ``x`` after flattening the batch dimensions.
      vocab: V, the number of classes in ``w`` (the local shard's when sharded).

    Returns:
      A positive int, at most ``max(num_tokens, 1)``.

    Examples:
      >>> default_chunk_size(8192, 32768)
      256
      >>> default_chunk_size(1000, 32768)
      256
      >>> default_chunk_size(1100, 32768)
      224
      >>> default_chunk_size(10, 32768)
      10
    """
    rows = _LOGIT_BLOCK_ELEMENTS // max(vocab, 1)
    rows = 1 << (max(rows, 1).bit_length() - 1)
    rows = min(max(rows, _MIN_CHUNK), _MAX_CHUNK)
    n = max(num_tokens, 1)
    if n <= rows:
        return n
    num_chunks = -(-n // rows)
    balanced = -(-n // num_chunks)
    return min(-(-balanced // 8) * 8, rows)


def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    chunk_size: int | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    axis_name=None,
) -> Array:
    r"""Cross-entropy of the linear head ``x @ w + bias``, one chunk of logits at a time.

    The value and the gradients with respect to ``x``, ``w`` and ``bias`` are those of
    ``fused_cross_entropy(logits, labels, ...)`` with the logits below, but the ``[N, V]``
    logits are never materialized: peak temporary memory is set by ``chunk_size``, not by the
    number of tokens. See the module docstring for the design and the chunk-size rule.

    .. math::

       z = c \tanh\big((x w + b) / c\big), \qquad
       \ell_i = (1 - \varepsilon)\big(\operatorname{lse}(z_i) - z_{i y_i}\big)
         + \varepsilon \big(\operatorname{lse}(z_i) - \tfrac{1}{V}\textstyle\sum_j z_{ij}\big)
         + \lambda \operatorname{lse}(z_i)^2

    with ``c`` the ``softcap`` (no cap when None), ``ε`` the ``label_smoothing`` and ``λ`` the
    ``z_loss`` coefficient. With ``-inf`` logits (e.g. a ``-inf`` bias on padded vocabulary
    entries) the smoothing mass goes to the finite logits only, as in
    ``fused_cross_entropy``.

    Args:
      x: hidden states, shape ``[..., D]``, floating.
      w: projection, shape ``[D, V]`` (pass ``table.T`` for a tied ``[V, D]`` embedding). Under
        ``axis_name``, the local shard ``[D, V / num_shards]``.
      labels: integer class ids, shape ``x.shape[:-1]``, global ids under ``axis_name``.
      bias: optional, shape ``[V]`` (the local shard under ``axis_name``).
      chunk_size: rows of ``x`` per chunk; None picks one from N and V. Need not divide N.
      ignore_index: examples whose label equals it get loss 0 and gradient 0 and are left out
        of the ``"mean"``.
      label_smoothing: ε in [0, 1); the target is ``(1 − ε)·onehot + ε/V``.
      z_loss: λ ≥ 0; adds ``λ · lse²`` per example (PaLM).
      softcap: None or c > 0; the logits become ``c · tanh(logits / c)`` (Gemma 2).
      reduction: ``"mean"`` (over non-ignored examples; 0 when all are ignored), ``"sum"`` or
        ``"none"``.
      axis_name: inside :func:`jax.shard_map`, the mesh axis along which ``w`` (and ``bias``)
        are split by vocabulary, in order. The result equals the unsharded call.

    Returns:
      float32 (float64 for float64 inputs) loss: a scalar, or shape ``x.shape[:-1]`` for
      ``reduction="none"``. A label outside ``[0, V)`` that is not ``ignore_index`` gives NaN
      for its example (and NaN in its contributions to the gradients).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> w = jnp.array([[1.0, -1.0, 0.5], [0.0, 1.0, -0.5]])
      >>> labels = jnp.array([0, 1, 2])
      >>> loss = linear_cross_entropy(x, w, labels, chunk_size=2)
      >>> print(round(float(loss), 4))
      0.7587
      >>> ref = jnp.mean(jax.nn.logsumexp(x @ w, axis=-1) - (x @ w)[jnp.arange(3), labels])
      >>> print(round(float(ref), 4))
      0.7587
      >>> dx, dw = jax.grad(linear_cross_entropy, argnums=(0, 1))(x, w, labels)
      >>> dx.shape, dw.shape
      ((3, 2), (2, 3))

    References:
      Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (Cut
      Cross-Entropy), 2024, https://arxiv.org/abs/2411.09009.
      Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024,
      https://arxiv.org/abs/2410.10989.
      Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018,
      https://arxiv.org/abs/1805.02867.
      Chowdhery et al., "PaLM" (z-loss), 2022, https://arxiv.org/abs/2204.02311.
    """
    x, w, labels, bias, label_smoothing, z_loss, softcap = _validate(
        x,
        w,
        labels,
        bias,
        chunk_size,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        reduction,
        axis_name,
    )
    if axis_name is None and sh.linear_is_explicitly_sharded(x, w):
        return sh.linear_over_mesh(
            linear_cross_entropy,
            x,
            w,
            labels,
            bias=bias,
            reduction=reduction,
            chunk_size=chunk_size,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
    batch_shape = x.shape[:-1]
    dim, vocab = w.shape
    n = math.prod(batch_shape)
    acc = _accumulation_dtype(x.dtype, w.dtype)

    if axis_name is None:
        num_classes, offset = vocab, 0
    else:
        num_classes = vocab * lax.axis_size(axis_name)
        offset = lax.axis_index(axis_name) * vocab

    y = labels.reshape(n)
    ignored = (y == ignore_index) if ignore_index is not None else jnp.zeros(n, dtype=bool)
    invalid = ~ignored & ((y < 0) | (y >= num_classes))
    # Row weights: 0 drops a row (ignored, or padding), NaN marks a bad label of that row only.
    weights = jnp.where(ignored, 0.0, jnp.where(invalid, jnp.nan, 1.0)).astype(acc)
    if reduction == "mean":
        weights = weights / jnp.maximum(jnp.sum(~ignored), 1).astype(acc)

    rows = default_chunk_size(n, vocab) if chunk_size is None else min(chunk_size, max(n, 1))
    num_chunks = -(-n // rows)
    pad = num_chunks * rows - n
    xs = x.reshape(n, dim)
    y_local = (y - offset).astype(jnp.int32)
    if pad:
        xs = jnp.pad(xs, ((0, pad), (0, 0)))
        y_local = jnp.pad(y_local, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    xs = xs.reshape(num_chunks, rows, dim)
    y_local = y_local.reshape(num_chunks, rows)
    weights = weights.reshape(num_chunks, rows)

    opts = _Options(
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        axis_name=axis_name,
        sum_rows=reduction != "none",
    )
    out = _chunked_loss(opts, xs, w, bias, y_local, weights)
    if reduction == "none":
        out = out.reshape(num_chunks * rows)[:n].reshape(batch_shape)
    return out


# ---------------------------------------------------------------------------------------------
# Validation.


def _validate(
    x,
    w,
    labels,
    bias,
    chunk_size,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    axis_name,
):
    x = jnp.asarray(x)
    w = jnp.asarray(w)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: must be a floating array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x: must have shape [..., D], got a scalar")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w: must be a floating array, got dtype {w.dtype}")
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"w: shape {w.shape} does not fit x of shape {x.shape}; expected "
            f"[{x.shape[-1]}, V] (pass table.T for a [V, D] embedding table)"
        )
    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias: must be a floating array, got dtype {bias.dtype}")
        if bias.shape != (w.shape[1],):
            raise ValueError(
                f"bias: shape {bias.shape} does not fit w of shape {w.shape}; "
                f"expected ({w.shape[1]},)"
            )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels: must be integer class ids, got dtype {labels.dtype} "
            "(linear_cross_entropy takes integer labels only)"
        )
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"labels: shape {labels.shape} does not match x.shape[:-1] = {x.shape[:-1]}"
        )
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size: must be a positive int or None, got {chunk_size!r}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
    ):
        raise TypeError(f"ignore_index: must be an int or None, got {ignore_index!r}")
    val.ignore_index_fits(ignore_index, labels.dtype)
    label_smoothing = val.static_float(label_smoothing, "label_smoothing", 0.0, 1.0)
    z_loss = val.static_float(z_loss, "z_loss", 0.0)
    if softcap is not None:
        try:
            cap = val.static_float(softcap, "softcap", 0.0)
        except ValueError:
            cap = 0.0
        if cap <= 0.0:
            raise ValueError(f"softcap: must be None or finite and > 0, got {float(softcap)}")
        softcap = cap
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: must be one of {_REDUCTIONS}, got {reduction!r}")
    if axis_name is not None:
        try:
            lax.axis_size(axis_name)
        except NameError as e:
            raise ValueError(
                f"axis_name: {axis_name!r} is not a bound mesh axis; call linear_cross_entropy "
                "inside jax.shard_map over that axis, with w split along V"
            ) from e
    # At least 32 bits, so that comparing labels with V (or a shard offset) cannot wrap.
    return x, w, val.integer_labels(labels), bias, label_smoothing, z_loss, softcap


def _accumulation_dtype(*dtypes):
    return nm.compute_dtype(jnp.result_type(*dtypes))


# ---------------------------------------------------------------------------------------------
# Per-chunk math. A chunk's logits are `scale * v` with v [C, V_local] in the accumulation dtype:
# v = x_c @ w + bias and scale = 1 without a softcap, v = tanh(u / c) and scale = c with one.
# Per-row quantities keep a trailing axis of size 1.


def _logits(xc, w, b, opts: _Options):
    """``(v, scale)`` for one chunk: the logits are ``scale * v`` (see above)."""
    acc = _accumulation_dtype(xc.dtype, w.dtype)
    cdt = jnp.result_type(xc.dtype, w.dtype)
    v = jnp.dot(xc.astype(cdt), w.astype(cdt), preferred_element_type=acc)
    if b is not None:
        v = v + b.astype(acc)[None, :]
    if opts.softcap is None:
        return v, None
    return jnp.tanh(v * (1.0 / opts.softcap)), opts.softcap


def _shifted(v, m, scale):
    """``d = z - max(z)`` as ``(v - m) · scale``: exactly 0 at the max.

    The subtraction comes first on purpose. XLA recomputes cheap elementwise producers inside
    every consumer, and ``scale · v - m`` may be contracted into one FMA there, which is not
    ``round(scale · v) - m``: the max entry would land a hair off 0 and be miscounted.
    """
    d = v - m
    return d if scale is None else d * scale


def _row_stats(v, scale, y_local, opts: _Options) -> _Stats:
    """Row statistics of a chunk, global over ``axis_name``: ``pmax`` of m, ``psum`` of sums.

    This is the only place the vocabulary shards talk: O(chunk) numbers per step.
    """
    ax = opts.axis_name
    m = jnp.max(v, axis=-1, keepdims=True)
    if ax is not None:
        m = lax.pmax(m, ax)
    nonempty = ~(m == -jnp.inf)  # a NaN max (NaN or +inf logits) must reach the loss as NaN
    m = jnp.where(nonempty, m, 0.0)  # a row of -inf logits keeps d = -inf, not nan
    d = _shifted(v, m, scale)
    e = jnp.exp(d)
    # floor(e) is 1 exactly at the max (e = 1) and 0 below it (e < 1): t counts the max
    # entries exactly, and e - floor(e) leaves them out of s, so no 1 + tiny is ever rounded.
    top = jnp.floor(e)
    sums = [e - top, top]
    if opts.label_smoothing:
        finite = jnp.isfinite(d)
        sums += [jnp.where(finite, d, 0.0), finite.astype(v.dtype)]
    # One multi-operand reduction: a single loop over the block that computes its operands
    # on the fly (separate sums would each materialize their input on XLA:CPU).
    s, t, *smooth = [r[:, None] for r in _sum_rows(sums)]
    sd, k = smooth if smooth else (None, None)
    vocab = v.shape[-1]
    dy = jnp.take_along_axis(d, jnp.clip(y_local, 0, vocab - 1)[:, None], axis=-1)
    if ax is not None:
        # The label's logit lives on exactly one shard; the others add 0.
        owned = ((y_local >= 0) & (y_local < vocab))[:, None]
        s, t, dy, sd, k = lax.psum((s, t, jnp.where(owned, dy, 0.0), sd, k), ax)
    if k is not None:
        k = jnp.maximum(k, 1.0)
    return _Stats(m, nonempty, t, s, dy, sd, k)


@jax.custom_jvp
def _sum_rows(arrays):
    """Row sums of several [C, V] arrays in one variadic ``lax.reduce``."""
    zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)
    return lax.reduce(
        tuple(arrays),
        zeros,
        lambda acc, new: tuple(p + q for p, q in zip(acc, new, strict=True)),
        (1,),
    )


@_sum_rows.defjvp
def _sum_rows_jvp(primals, tangents):
    # A sum is linear; plain sums keep the tangent transposable (for differentiating through
    # the backward pass, e.g. a gradient penalty).
    (arrays,), (dots,) = primals, tangents
    return _sum_rows(arrays), tuple(jnp.sum(t, axis=1) for t in dots)


def _log_partition(st: _Stats):
    """``lse - max`` as ``log1p(T)``, ``T = (t - 1) + s``: exact for a confident row."""
    return jnp.log1p(jnp.where(st.nonempty, (st.t - 1.0) + st.s, 0.0))


def _safe_lse(st: _Stats, scale):
    top = st.m if scale is None else st.m * scale
    return jnp.where(st.nonempty, top + _log_partition(st), 0.0)


def _row_loss(st: _Stats, scale, weights, opts: _Options):
    """Weighted per-row loss, shape [C]: every term is non-negative, so nothing cancels."""
    eps = opts.label_smoothing
    # -log a_y = log1p(T) - d_y.
    loss = _log_partition(st) - ((1.0 - eps) * st.dy if eps else st.dy)
    if eps:
        loss = loss - (eps / st.k) * st.sd  # the eps/K share on every finite logit
    if opts.z_loss:
        loss = loss + opts.z_loss * _safe_lse(st, scale) ** 2
    # Weight 0 (ignored or padding) and rows with no finite logit give exactly 0, whatever
    # their loss; a NaN weight (bad label) makes the row NaN.
    keep = (weights[:, None] != 0) & st.nonempty
    return jnp.where(keep, loss * weights[:, None], 0.0)[:, 0]


def _logit_grad(v, scale, st: _Stats, y_local, row_scale, opts: _Options):
    """``row_scale · d loss_row / dz`` for one chunk, shape [C, V_local]."""
    keep = (row_scale[:, None] != 0) & st.nonempty
    wgt = jnp.where(keep, row_scale[:, None], 0.0)
    p = 1.0 + jnp.where(st.nonempty, (st.t - 1.0) + st.s, 0.0)  # t + s, 1 for an empty row
    d = _shifted(v, st.m, scale)
    e = jnp.exp(d)
    eps = opts.label_smoothing
    lt = 2.0 * opts.z_loss * _safe_lse(st, scale) if opts.z_loss else 0.0
    # a_i (1 + 2c·lse) - eps·f_i/K everywhere: one multiply of exp(d) per entry.
    grad = e * ((1.0 + lt) * wgt / p)
    if eps:
        grad = grad - (eps * wgt / st.k) * jnp.isfinite(d).astype(v.dtype)
    # The label's component: a_y - 1 as ((e_y - t) - s) / (t + s), never 1 - (almost 1).
    ey = jnp.exp(st.dy)
    gy = ((ey - st.t) - st.s) / p
    if opts.z_loss:
        gy = gy + lt * ey / p
    if eps:
        gy = gy + eps * (1.0 - jnp.isfinite(st.dy).astype(v.dtype) / st.k)
    cols = lax.broadcasted_iota(y_local.dtype, (1, v.shape[-1]), 1)
    return jnp.where(cols == y_local[:, None], gy * wgt, grad)


def _pre_cap_grad(dz, v, scale):
    """Chains the softcap: d(c·tanh(u/c))/du = (1 - v)(1 + v), as JAX's own tanh rule."""
    return dz if scale is None else dz * ((1.0 - v) * (1.0 + v))


def _chunk_grads(xc, w, dz):
    """``dx_c = dz @ wᵀ`` and this chunk's ``x_cᵀ @ dz``, accumulated in float32."""
    acc = dz.dtype
    cdt = jnp.result_type(xc.dtype, w.dtype)
    dzc = dz.astype(cdt)  # 16-bit inputs: the logits' gradient in their dtype, as autodiff has
    dx = lax.dot_general(dzc, w.astype(cdt), (((1,), (1,)), ((), ())), preferred_element_type=acc)
    dw = lax.dot_general(xc.astype(cdt), dzc, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    return dx, dw


# ---------------------------------------------------------------------------------------------
# The custom_vjp core: xs [nC, C, D], w [D, V], b [V] or None, ys [nC, C] local label ids,
# weights [nC, C] row weights (0: dropped row, NaN: bad label, else 1 or 1/count for "mean").


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_loss(opts: _Options, xs, w, b, ys, weights):
    def step(_, inp):
        xc, yc, wc = inp
        v, scale = _logits(xc, w, b, opts)
        return None, _row_loss(_row_stats(v, scale, yc, opts), scale, wc, opts)

    _, rows = lax.scan(step, None, (xs, ys, weights))
    return jnp.sum(rows) if opts.sum_rows else rows


def _chunked_loss_fwd(opts: _Options, xs, w, b, ys, weights):
    if opts.sum_rows:
        return _fwd_with_grads(opts, xs, w, b, ys, weights)
    return _fwd_rows(opts, xs, w, b, ys, weights)


def _chunked_loss_bwd(opts: _Options, res, g):
    if opts.sum_rows:
        return _bwd_scale(opts, res, g)
    return _bwd_recompute(opts, res, g)


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def _fwd_with_grads(opts, xs, w, b, ys, weights):
    """ "sum"/"mean": the loss and all three gradients in one pass (three matmuls per chunk)."""
    acc = _accumulation_dtype(xs.dtype, w.dtype)
    like = (xs, w, b, ys, weights)
    dw0 = _zeros_varying(w.shape, acc, like)
    db0 = None if b is None else _zeros_varying(b.shape, acc, like)

    def step(carry, inp):
        dw_acc, db_acc = carry
        xc, yc, wc = inp
        v, scale = _logits(xc, w, b, opts)
        st = _row_stats(v, scale, yc, opts)
        rows = _row_loss(st, scale, wc, opts)
        dz = _pre_cap_grad(_logit_grad(v, scale, st, yc, wc, opts), v, scale)
        dxc, dwc = _chunk_grads(xc, w, dz)
        if db_acc is not None:
            db_acc = db_acc + jnp.sum(dz, axis=0)
        return (dw_acc + dwc, db_acc), (rows, dxc.astype(xs.dtype))

    (dw, db), (rows, dx) = lax.scan(step, (dw0, db0), (xs, ys, weights))
    # Under axis_name each shard's dx is the part from its own vocabulary; _fit_vma sums it
    # (with check_vma=False, shard_map's own transpose does, as for any replicated input).
    # Saved: the finished gradients. The cotangent of a scalar loss only scales them.
    return jnp.sum(rows), (dx, dw, db, xs, w, b)


def _bwd_scale(opts, res, g):
    dx, dw, db, xs, w, b = res
    acc = dw.dtype
    g = _full_cotangent(g, w, opts).astype(acc)
    dx = (dx.astype(acc) * g).astype(xs.dtype)
    dw = (dw * g).astype(w.dtype)
    db = None if b is None else (db * g).astype(b.dtype)
    return (_fit_vma(dx, xs), _fit_vma(dw, w), _fit_vma(db, b), None, None)


def _fwd_rows(opts, xs, w, b, ys, weights):
    """ "none": per-row losses; saves a few floats per row for the backward's recomputation."""

    def step(_, inp):
        xc, yc, wc = inp
        v, scale = _logits(xc, w, b, opts)
        st = _row_stats(v, scale, yc, opts)
        return None, (_row_loss(st, scale, wc, opts), st)

    _, (rows, stats) = lax.scan(step, None, (xs, ys, weights))
    # Saved: the inputs and the per-row statistics (m, t, s, z_y - m, and K and the finite sum
    # for smoothing), so the backward recomputes each chunk's logits once and reduces nothing.
    return rows, (xs, w, b, ys, weights, stats)


def _bwd_recompute(opts, res, g):
    xs, w, b, ys, weights, stats = res
    g = _full_cotangent(g, w, opts)
    acc = _accumulation_dtype(xs.dtype, w.dtype)
    like = (xs, w, b, ys, weights, g)
    dw0 = _zeros_varying(w.shape, acc, like)
    db0 = None if b is None else _zeros_varying(b.shape, acc, like)

    def step(carry, inp):
        dw_acc, db_acc = carry
        xc, yc, wc, gc, st = inp
        v, scale = _logits(xc, w, b, opts)
        # A dropped row stays exactly 0 even if its cotangent is not finite.
        row_scale = jnp.where(wc != 0, wc * gc.astype(acc), 0.0)
        dz = _pre_cap_grad(_logit_grad(v, scale, st, yc, row_scale, opts), v, scale)
        dxc, dwc = _chunk_grads(xc, w, dz)
        if db_acc is not None:
            db_acc = db_acc + jnp.sum(dz, axis=0)
        return (dw_acc + dwc, db_acc), dxc.astype(xs.dtype)

    (dw, db), dx = lax.scan(step, (dw0, db0), (xs, ys, weights, g, stats))
    dw = dw.astype(w.dtype)
    db = None if b is None else db.astype(b.dtype)
    return (_fit_vma(dx, xs), _fit_vma(dw, w), _fit_vma(db, b), None, None)


# ---------------------------------------------------------------------------------------------
# shard_map typing: accumulators start varying like the values added to them, and each
# cotangent is brought to its primal's varying axes (a psum where the primal is replicated).


def _vma(a) -> frozenset:
    if a is None:
        return frozenset()
    aval = jax.typeof(a)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _full_cotangent(g, w, opts: _Options):
    """The loss's cotangent as this shard's backward needs it.

    Under ``shard_map(check_vma=True)`` the loss is typed invariant over ``axis_name`` and each
    shard receives the whole cotangent. With ``check_vma=False``, shard_map hands each shard
    ``1/size`` of it and relies on every ``psum`` in the forward pass transposing to a ``psum``;
    the statistics here are ``psum`` s, so the cotangent is summed back the same way.
    """
    ax = opts.axis_name
    if ax is None:
        return g
    names = frozenset(ax) if isinstance(ax, tuple) else frozenset([ax])
    return g if names <= _vma(w) else lax.psum(g, ax)


def _zeros_varying(shape, dtype, like):
    z = jnp.zeros(shape, dtype)
    axes = frozenset().union(*(_vma(a) for a in like))
    if axes:
        z = lax.pcast(z, tuple(sorted(axes, key=str)), to="varying")
    return z


def _fit_vma(ct, primal):
    if ct is None:
        return None
    have, want = _vma(ct), _vma(primal)
    extra = tuple(sorted(have - want, key=str))
    if extra:
        ct = lax.psum(ct, extra)
    missing = tuple(sorted(want - have, key=str))
    if missing:
        ct = lax.pcast(ct, missing, to="varying")
    return ct
