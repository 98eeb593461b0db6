r"""Row statistics of a softmax, computed without cancellation.

Everything in this package is built on two numbers per row of logits :math:`z`, with
:math:`m = \max_j z_j` and :math:`d = z - m`:

.. math::

   S = \sum_j e^{d_j}, \qquad
   T = S - 1 = (t - 1) + \sum_{j : d_j < 0} e^{d_j},

where :math:`t` is the number of entries equal to the max, so that

.. math::

   \log\sum_j e^{z_j} = m + \operatorname{log1p}(T).

Why this form:

* The textbook ``log(sum(exp(z - m)))`` rounds ``S = 1 + s`` before the log, so every digit of a
  small ``s`` is lost: a confident prediction whose true loss is 1e-9 comes out as 0. ``T`` is
  summed directly instead: each entry below the max adds ``exp(d)``, and each of the ``t`` max
  entries adds ``1 - 1/t`` (0 when the max is unique), so no ``1 + tiny`` is ever rounded and
  exact ties are ordinary.
* ``1 - a_max = T / (1 + T)`` and the label's ``a_y - 1 = ((e^{d_y} - 1) - T) / (1 + T)`` follow
  from the same numbers, with no ``1 - (something close to 1)`` anywhere.

How it stays fast (XLA:CPU, measured with ``experiments/bench_loss.py``; inspect with
``jax.jit(f).lower(x).compile().as_text()`` and XLA's profile):

* XLA:CPU runs a fused reduction as a graph of vector passes over each tile: every operation
  per entry costs a pass, ``exp`` about three plain ones. A select or a boolean count inside
  the sum, or two sums of the same input, made it 3-7x slower. So the big sum is
  ``sum exp(z - m)`` and nothing else.
* Rows at least two 128-class blocks wide (class axis last, no ``axis_name``) are summed per
  block (128-class blocks, or 128 wider blocks above 16384 classes: ``_split_blocks``), and
  only one gathered block per row is summed again with an entry left out: the label
  (``_sum_without_label``, for the fused loss), or a max entry of the block with the largest
  sum (``_sum_without_a_max``, for ``T``). The entry is left out by ``sign(|j - index|)`` on a
  class-index iota, arithmetic rather than a select. Nothing is subtracted, so a remainder of
  1e-30 next to the max's ``e^0 = 1`` keeps its digits, and no tie count is needed: other
  entries at the max add 1 each.
* An ``optimization_barrier`` keeps the ``[rows, blocks]`` block sums as an array. Without it
  XLA merges the two reductions into one per row, and a few long rows (``[64, 262144]``) then
  run on one core: 150 ms instead of 12 ms for the sum.
* The forward pass reads the logits twice (the row max, the block sums) and gathers one block
  per row; it writes nothing of their size. The fused loss's backward pass reads them once more
  and writes the gradient as one multiply per entry, the label entries set by a scatter. In a
  ``value_and_grad`` of the fused loss (integer labels without smoothing, 32/64-bit logits, a
  multiple of 128 classes) the two passes spell ``exp(z - m)`` alike, and XLA computes it once:
  written into the gradient's buffer (a fresh ``[rows, classes]`` write, bound by page faults on
  CPU, which the ``exp`` adds little to), summed from there, then scaled in place
  (``_block_sums``'s ``z``).
* 16-bit logits are widened to float32 for every sum, and XLA:CPU writes the widened copy out
  as a ``[rows, classes]`` float32 array for each fused reduction that reads it (a widening
  inside the block sums ran 5x slower than the float32 sum). The row max is therefore
  taken in the logits' own dtype, where it is the same number (``raw_max``'s ``narrow``), so
  one copy is written (for the block sums) instead of two.
* XLA:CPU's fused ``min`` and ``max`` drop NaN at some shapes (a row max over
  ``[4096, 4096]`` ignores a NaN entry). ``exp(z - m)`` carries a NaN into the sums, and a row
  counts as non-empty when its max is above ``-inf`` *or* its sum is NaN (``_nonempty``).
* Rows narrower than two blocks, another class axis, or ``axis_name`` use one chain of
  reductions instead: ``top = 1 + sign(d)`` is 1 at the max and 0 below it, ``t = sum(top)``,
  and ``T = sum(exp(d - BIG * top) + top * (1 - 1/t))`` (see ``_stats``).
* ``m``, ``S`` and ``T`` are one ``jax.custom_jvp``: the primal is the fast formulation above, and
  the tangent is the textbook one, ``dS = dT = sum(exp(d) * dz)`` with ``m`` a constant (the
  formulas are invariant to it). Autodiff of everything built on top is right to every order.
* Rows with nothing included (all masked or all ``-inf``) get ``m = 0`` so that ``d = -inf``
  rather than ``-inf - (-inf) = nan``; their ``S`` is 0 and their ``T`` is 0, so no ``log(0)`` or
  ``inf * 0`` reaches a gradient.

With ``axis_name``, the class axis is split over a mapped mesh axis and the row statistics are
combined with ``pmax`` (the max) and ``psum`` (the sums); everything else is local.

This is XLA:CPU's formulation. A program lowered for any other platform computes the same
statistics as :mod:`jsoftmax._portable` states them: ``_stats`` (the primal of ``row_stats``)
picks one when the program is lowered (:func:`jsoftmax._platform.by_platform`), as does the
fused loss. The block sums, the ``optimization_barrier`` and the gathered block cost XLA's TPU
and GPU compilers extra passes over the logits. ``partition_sum`` (the softmax) has one
formulation for every platform: it moves what ``jax.nn.softmax`` does on the TPU and GPU
compilers too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _portable as pt
from ._platform import by_platform


def compute_dtype(dtype) -> jnp.dtype:
    """16-bit floats are computed in float32; float32 and float64 in themselves.

    Chosen by width, not by ``jnp.promote_types(dtype, float32)``: that is a promotion, which
    ``jax.numpy_dtype_promotion("strict")`` refuses for every dtype but float32.
    """
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def compute_logits(x: jax.Array, where: jax.Array | None) -> jax.Array:
    """The logits as every formula here sees them: in the compute dtype, excluded entries -inf."""
    return mask_logits(x.astype(compute_dtype(x.dtype)), where)


def narrow_dtype(dtype):
    """The dtype of 16-bit logits, in which every value of ``compute_logits`` is exact (its
    float32 values are widened 16-bit ones, or ``-inf``); None for wider logits. See ``raw_max``."""
    return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize < 4 else None


@jax.custom_jvp
def shifted(z: jax.Array, m: jax.Array) -> jax.Array:
    """``z - m`` for ``z <= m``, exactly 0 where ``z == m`` even if XLA fuses z's producer in.

    Written ``min(z, m) - m``: a fused producer ``c * t`` followed by ``- m`` may be contracted
    into one FMA (``c * t - m`` rounded once), which is not 0 at the max entry, and a producer
    recomputed in another fusion (a ``tanh``, say) may round differently from the one the max
    saw. ``min`` rounds ``z`` first, cannot be contracted, and clamps the second case to 0.
    """
    return jnp.minimum(z, m) - m


@shifted.defjvp
def _shifted_jvp(primals, tangents):
    (z, m), (dz, dm) = primals, tangents
    # The derivative of z - m (min would split a tie with m in half).
    return shifted(z, m), dz - dm


def mask_logits(z: jax.Array, where: jax.Array | None) -> jax.Array:
    """Excluded entries become ``-inf``: probability exactly 0 and no gradient."""
    return z if where is None else jnp.where(where, z, -jnp.inf)


def psum(x: jax.Array, axis_name) -> jax.Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def raw_max(z: jax.Array, axis: int, axis_name=None, narrow=None) -> jax.Array:
    """The row max (keepdims) as a constant: ``-inf`` for an empty row, NaN for a NaN row.

    ``narrow``: a dtype that holds every value of ``z`` exactly (``narrow_dtype``). The max is
    then taken there, where it is the same number: XLA folds the round trip 16-bit -> float32
    -> 16-bit and reads the 16-bit logits, instead of writing out a float32 copy of them for
    this pass (XLA:CPU does that for a widening feeding a fused reduction; about 20% of a 16-bit
    ``value_and_grad``, measured in ``experiments/bench_loss.py``).
    """
    v = z if narrow is None else z.astype(narrow)
    m = lax.stop_gradient(jnp.max(v, axis, keepdims=True)).astype(z.dtype)
    return m if axis_name is None else lax.pmax(m, axis_name)


def finite_shift(m: jax.Array) -> jax.Array:
    """An empty row's max ``-inf`` becomes 0, so that ``d = z - m`` is ``-inf``, not NaN."""
    return jnp.where(m == -jnp.inf, jnp.zeros((), m.dtype), m)


def _nonempty(m_raw: jax.Array, total: jax.Array) -> jax.Array:
    """Rows with something included: a max above ``-inf``, or a NaN anywhere.

    A NaN or ``+inf`` logit counts as included so that it reaches the loss. The sum is asked as
    well because XLA:CPU's fused row max drops NaN at some shapes (``max(NaN, -inf)`` comes out
    ``-inf``), while ``exp(z - m)`` carries it into every sum.
    """
    return ~(m_raw == -jnp.inf) | jnp.isnan(total)


# exp(d - _DROP * (1 + sign d)) underflows to exactly 0 at the max entries (d == 0).
_DROP = 1e30


class RowStats(NamedTuple):
    """Per-row statistics, each with the class axis kept as size 1."""

    m: jax.Array  # row max (constant for autodiff); 0 for empty rows
    S: jax.Array  # sum of exp(z - m); 0 for empty rows
    T: jax.Array  # S - 1 without cancellation; 0 for empty rows

    @property
    def nonempty(self) -> jax.Array:
        # NaN (from a NaN or +inf logit) counts as non-empty, so it reaches the loss.
        return self.S != 0

    @property
    def log_z(self) -> jax.Array:
        """``log S``, the log partition function relative to ``m``, as ``log1p(T)``."""
        return jnp.log1p(self.T)

    @property
    def lse(self) -> jax.Array:
        """``logsumexp``: ``m + log1p(T)``, and ``-inf`` for an empty row."""
        return jnp.where(self.nonempty, self.m + self.log_z, -jnp.inf)

    @property
    def partition(self) -> jax.Array:
        """``1 + T`` (1 for an empty row, so that dividing by it is always safe)."""
        return 1 + self.T


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _stats(z: jax.Array, axis: int, axis_name, narrow) -> tuple[jax.Array, jax.Array, jax.Array]:
    # The primal only: the switch between formulations stays out of autodiff's way (the JVP
    # below is the textbook one on every platform).
    return by_platform(
        functools.partial(_tuned_stats, axis=axis, axis_name=axis_name, narrow=narrow),
        functools.partial(pt.row_stats, axis=axis, axis_name=axis_name),
        z,
    )


def _tuned_stats(z: jax.Array, axis: int, axis_name, narrow):
    """``(m, S, T)`` as XLA:CPU computes them fast (the module docstring)."""
    parts = _split_blocks(z) if axis_name is None and axis in (-1, z.ndim - 1) else None
    if parts is not None:
        # Rows two blocks wide or more, class axis last: T from a sum without one max entry.
        m_raw, t_minus_one = _sum_without_a_max(z, parts, narrow)
    else:
        m_raw, t_minus_one = _one_chain(z, axis, axis_name, narrow)
    nonempty = _nonempty(m_raw, t_minus_one)
    zero = jnp.zeros((), z.dtype)
    return (
        finite_shift(m_raw),
        jnp.where(nonempty, 1 + t_minus_one, zero),
        jnp.where(nonempty, t_minus_one, zero),
    )


def _one_chain(z: jax.Array, axis: int, axis_name, narrow) -> tuple[jax.Array, jax.Array]:
    """``(max, T)`` (keepdims) from one chain of reductions: the max, the tie count, ``T``."""
    m_raw = raw_max(z, axis, axis_name, narrow)
    m = finite_shift(m_raw)
    if axis_name is None:
        # The same max again, spelled -min(-z) so that XLA does not merge it with ``m``: ``m`` is
        # needed outside (the gather, the residuals), and XLA:CPU does not fuse a reduction with
        # a row max that has users elsewhere; it would write ``z - m`` out as a [rows, classes]
        # array instead. Recomputed here, the max, the count and the sum below are one fusion
        # that reads each row once. The max is exact, so both spellings agree.
        inner = finite_shift(lax.stop_gradient(-jnp.min(-z, axis, keepdims=True)))
    else:
        inner = m
    d = shifted(z, inner)  # exactly 0 at the max entries, whatever XLA fuses in
    # top = 1 at the max entries and 0 below them (NaN for a NaN entry), with no compare.
    top = 1 + jnp.sign(d)
    count = psum(jnp.sum(top, axis, keepdims=True), axis_name)  # t, the number of max entries
    share = 1 - 1 / jnp.maximum(count, 1)  # each max entry's part of t - 1 (0 when t = 1)
    big = jnp.asarray(_DROP, d.dtype)
    # T = (t - 1) + sum_{d < 0} exp(d) as ONE sum: exp(d - BIG) is exactly 0 at the max entries,
    # which add share each instead. Only the final sum leaves the chain: any other output of it
    # (the count, say) would split the fusion and materialize d.
    t_minus_one = psum(
        jnp.sum(jnp.exp(d - big * top) + top * share, axis, keepdims=True), axis_name
    )
    return m_raw, t_minus_one


@_stats.defjvp
def _stats_jvp(axis, axis_name, narrow, primals, tangents):
    (z,), (dz,) = primals, tangents
    m, total, t_minus_one = _stats(z, axis, axis_name, narrow)
    # m is a constant (every formula is invariant to it); dS = dT = sum(exp(z - m) dz).
    dsum = psum(jnp.sum(jnp.exp(z - m) * dz, axis, keepdims=True), axis_name)
    return (m, total, t_minus_one), (jnp.zeros_like(m), dsum, dsum)


# Width of the blocks that wide rows are summed in (see ``_block_sums``).
_BLOCK = 128


def _sum_without(z: jax.Array, m: jax.Array, index: jax.Array) -> jax.Array:
    """``sum_j exp(z_j - m)`` over the last axis, leaving out ``j == index`` (``[..., 1]``).

    The entry is left out by ``sign(|j - index|)``, arithmetic on a float iota (exact for up to
    2**24 columns), not by a compare and select, which XLA:CPU does not vectorize inside a sum.
    An ``index`` outside ``[0, width)`` leaves nothing out.
    """
    j = lax.broadcasted_iota(z.dtype, z.shape, z.ndim - 1)
    keep = jnp.sign(jnp.abs(j - index.astype(z.dtype)))
    return jnp.sum(jnp.exp(z - m) * keep, -1, keepdims=True)


class _Blocks(NamedTuple):
    """A row split into blocks (``main``, ``[..., blocks, width]``) and the ragged ``tail``
    after them (``[..., rest]``, or None); see ``_split_blocks``."""

    main: jax.Array
    tail: jax.Array | None


def _split_blocks(z: jax.Array) -> _Blocks | None:
    """The blocks of ``z`` (class axis last), or None for rows under two blocks wide and for a
    class axis split over explicit mesh axes (those take the one-chain path of ``_stats``).

    Rows of up to ``_BLOCK**2`` classes are ``C // _BLOCK`` blocks of ``_BLOCK`` classes; wider
    rows are ``_BLOCK`` blocks of ``C // _BLOCK`` classes (up to ``_BLOCK - 1`` classes left
    for the tail). Either way, when ``C`` is a multiple of ``_BLOCK`` and ``jax.jit`` partitions
    the class axis over ``P`` devices, every shard holds whole blocks whenever ``P`` divides the
    number of blocks (any power of two up to 128 for rows over 16384 classes), so XLA need not
    move logits between shards to form them.
    """
    num = z.shape[-1]
    blocks = min(num // _BLOCK, _BLOCK)
    if blocks < 2 or _class_axis_sharded(z):
        return None
    width = (num // _BLOCK) * _BLOCK // blocks  # _BLOCK, or num // _BLOCK for wide rows
    main_width = blocks * width
    main = z if main_width == num else lax.slice_in_dim(z, 0, main_width, axis=-1)
    tail = lax.slice_in_dim(z, main_width, num, axis=-1) if main_width < num else None
    return _Blocks(main.reshape(z.shape[:-1] + (blocks, width)), tail)


def _class_axis_sharded(z: jax.Array) -> bool:
    """Whether the type of ``z`` says its last axis is split over mesh axes (``Explicit``)."""
    try:
        spec = jax.typeof(z).sharding.spec
    except (AttributeError, TypeError):  # no sharding in the type
        return False
    return len(spec) == z.ndim and spec[-1] is not None


def _block_sums(parts: _Blocks, m: jax.Array, z: jax.Array | None = None) -> jax.Array:
    r"""Every block's ``sum exp(z - m)``, ``[..., blocks]``. Why this shape is fast on XLA:CPU
    (measured in ``experiments/bench_loss.py``):

    * the per-entry work is ``exp(z - m)`` alone; leaving an entry out with a class-index iota
      costs another five operations per entry, which XLA:CPU's fused reduction runs as separate
      vector passes over each tile (+50% time). Entries are left out of one gathered block only;
    * an ``optimization_barrier`` keeps the block sums as an array. Without it XLA merges the
      two reductions back into one over the whole row, and a single long row (``[64, 262144]``)
      then runs on one core at a tenth of the speed.

    A sum over a reshape to ``[..., blocks, width]``, not a ``reduce_window``: with the latter
    XLA:CPU writes the broadcast row max out as a ``[rows, classes]`` array, 50% more time.

    ``exp(z - m)``, not ``exp(shifted(z, m))``: a tie at the max that comes out as
    ``exp(±1 ulp)`` is a rounding-level change, and one multiply per entry less.

    ``z`` (the whole ``[..., C]`` logits ``parts`` come from), for the forward rule of the fused
    loss, whose backward pass takes ``jnp.exp(z - m)`` over ``[..., C]``: the exponentials are
    then spelled exactly that way, and in a ``value_and_grad`` XLA computes them once. It writes
    them into the gradient's buffer (a write both programs make anyway), the block sums read
    them, and the backward pass scales them in place, as XLA does with optax's loss: 3-11% less
    time than exponentiating in both passes (``experiments/bench_loss.py``). Only for rows the
    blocks cover whole: with a tail XLA kept the exponentials in a ``[rows, classes]``
    temporary of their own. Without a backward pass to share with, that spelling is not fused
    into the block sums by XLA:CPU (3x slower alone), so the loss by itself passes no ``z``.
    """
    if z is None or parts.tail is not None:
        e = jnp.exp(parts.main - m[..., None])
    else:
        e = jnp.exp(z - m).reshape(parts.main.shape)
    return lax.optimization_barrier(jnp.sum(e, -1))


def _pick_block(parts: _Blocks, sums: jax.Array, block: jax.Array):
    """The logits of block ``block`` (``[..., 1]``), and the sum of all other blocks."""
    own = lax.broadcasted_iota(block.dtype, sums.shape, sums.ndim - 1) == block
    others = jnp.sum(jnp.where(own, jnp.zeros((), sums.dtype), sums), -1, keepdims=True)
    picked = jnp.take_along_axis(parts.main, block[..., None], axis=-2)[..., 0, :]
    return picked, others


def _sum_without_label(
    z: jax.Array, m: jax.Array, label: jax.Array, shared_exp: bool = False
) -> jax.Array:
    r"""``Q = sum_{j != label} exp(z_j - m)`` per row (class axis last), ``[..., 1]``.

    ``label`` is this shard's local class index; one outside ``[0, C)`` leaves nothing out. In
    blocks: the sums of all blocks but the label's, plus the label's block summed again
    without the label (gathered, one block per row). Nothing is subtracted, so a tiny
    ``Q`` next to ``e_y = 1`` keeps all its digits. ``shared_exp``: the block sums spell
    ``exp(z - m)`` as the fused loss's backward pass does (see ``_block_sums``).
    """
    parts = _split_blocks(z)
    if parts is None:
        return _sum_without(z, m, label)
    blocks, width = parts.main.shape[-2:]
    block = jnp.clip(label // width, 0, blocks - 1)  # [..., 1]
    inside = (label >= 0) & (label < blocks * width)
    sums = _block_sums(parts, m, z if shared_exp else None)
    picked, others = _pick_block(parts, sums, block)
    q = others + _sum_without(picked, m, jnp.where(inside, label - block * width, -1))
    if parts.tail is not None:
        q = q + _sum_without(parts.tail, m, label - blocks * width)
    return q


def _minus_one(part: jax.Array, m: jax.Array) -> jax.Array:
    """``sum exp(part - m) - 1`` over the last axis (``[..., 1]``), to every digit when ``part``
    holds a max entry, for ``part`` no wider than a block.

    With ``t`` the number of max entries in ``part`` and ``R`` the sum over the entries below
    the max, this is ``R + (t - 1)``: when ``t >= 1`` no ``1 + tiny`` is ever rounded, and when
    ``t = 0`` it is the plain ``sum - 1`` (exact to rounding where ``_sum_without_a_max`` uses
    it). Two small sums, no ``argmax`` (a two-output reduction that XLA:CPU runs unvectorized).
    """
    # sign(d) is -1 below the max and 0 at it (shifted() clamps a recomputed max entry to 0);
    # exp(part - m), not exp(d), so that a NaN or +inf entry makes the sum NaN.
    below = -jnp.sign(shifted(part, m))
    rest = jnp.sum(jnp.exp(part - m) * below, -1, keepdims=True)
    ties = jnp.sum(1 - below, -1, keepdims=True)
    return rest + (ties - 1)


def _sum_without_a_max(z: jax.Array, parts: _Blocks, narrow=None) -> tuple[jax.Array, jax.Array]:
    r"""``(max, T)`` per row (class axis last, ``[..., 1]``): ``T = sum_j e^{z_j - m} - 1``.

    One pass for the row max and one for the block sums (``_block_sums``). The block with the
    largest sum (or the tail) is summed again as ``sum - 1`` by ``_minus_one``: if it holds a
    max entry, without that entry, so ``T`` keeps every digit however small it is; if it does
    not, another block holds a max entry and has a sum of at least 1, so ``T >= 1`` and the
    plain ``sum - 1`` is exact to rounding. The max is ``-inf`` for an empty row. ``parts``:
    ``_split_blocks(z)``; ``narrow``: see ``raw_max``.
    """
    m_raw = raw_max(z, -1, narrow=narrow)
    m = finite_shift(m_raw)
    sums = _block_sums(parts, m)
    block = jnp.argmax(sums, -1, keepdims=True)
    picked, others = _pick_block(parts, sums, block)
    from_block = others + _minus_one(picked, m)
    if parts.tail is None:
        return m_raw, from_block
    block_sum = jnp.take_along_axis(sums, block, -1)
    tail_sum = jnp.sum(jnp.exp(parts.tail - m), -1, keepdims=True)
    from_tail = jnp.sum(sums, -1, keepdims=True) + _minus_one(parts.tail, m)
    return m_raw, jnp.where(tail_sum > block_sum, from_tail, from_block + tail_sum)


def label_row_stats(
    z: jax.Array,
    z_y: jax.Array,
    label: jax.Array,
    offset,
    axis_name=None,
    narrow=None,
    shared_exp: bool = False,
) -> RowStats:
    r"""Row statistics of ``z`` (class axis last) from one sum that leaves the label out.

    For an integer label ``y`` the loss needs ``S`` only as ``e_y + Q`` with
    :math:`Q = \sum_{j \ne y} e^{d_j}`, and the label's gradient ``a_y - 1 = -Q / S``. No tie
    count is needed: other entries at the max simply add 1 each to ``Q``. When ``y`` is at the
    max, ``T = (e_y - 1) + Q = Q`` exactly, with every digit of a tiny ``Q``. How ``Q`` is summed
    fast: ``_sum_without_label``.

    Used inside the fused loss's forward pass only (no autodiff goes through it).

    Args:
      z: logits, ``[..., C_local]``. z_y: the label's logit, ``[..., 1]`` (global under
        ``axis_name``). label: global class index, ``[..., 1]``, in range. offset: index of this
        shard's first class. narrow: see ``raw_max``. shared_exp: True in the forward rule,
        whose backward pass takes ``jnp.exp(z - m)`` (see ``_block_sums``).
    """
    m_raw = raw_max(z, -1, axis_name, narrow)
    m = finite_shift(m_raw)
    local = label.astype(jnp.int32) - offset  # signed: block arithmetic below may go negative
    q = psum(_sum_without_label(z, m, local, shared_exp), axis_name)
    e_y = jnp.exp(shifted(z_y, m))
    total = e_y + q
    nonempty = _nonempty(m_raw, total)
    zero = jnp.zeros((), z.dtype)
    return RowStats(m, jnp.where(nonempty, total, zero), jnp.where(nonempty, (e_y - 1) + q, zero))


def row_stats(
    z: jax.Array, axis: int = -1, axis_name=None, narrow=None
) -> tuple[RowStats, jax.Array]:
    """Statistics of each row of ``z`` (already masked) and the shifted logits ``d = z - m``.

    ``narrow``: a dtype that holds every value of ``z`` exactly, or None (see ``raw_max``)."""
    stats = RowStats(*_stats(z, axis, axis_name, narrow))
    return stats, shifted(z, stats.m)


def partition_sum(
    z: jax.Array, axis: int = -1, axis_name=None, narrow=None
) -> tuple[jax.Array, jax.Array]:
    """``(exp(z - m), sum exp(z - m))``: all the softmax itself needs (no ``log1p`` later).

    Spelled as ``jax.nn.softmax`` is, which XLA:CPU turns into one fused pass per row at
    ``[8192, 4096]`` (max, sum and output; any other operation on the sum splits it into three
    passes, 20% slower). An empty row's max ``-inf`` is lifted to the lowest finite float, so
    ``z - m`` stays ``-inf`` there, and the sum starts at ``eps / 4`` instead of 0: the empty
    row is ``0 / (eps / 4) = 0`` with a finite derivative, while any other sum (at least 1) is
    unchanged, since ``eps / 4`` is below half its last place.
    """
    info = jnp.finfo(z.dtype)
    m = jnp.maximum(raw_max(z, axis, axis_name, narrow), jnp.asarray(info.min, z.dtype))
    # z * one - m with one = (m - m) + 1, a 1 that XLA cannot fold away: z * one rounds a fused
    # producer of z first (an FMA of it, z * 1 - m, is exact), so the max entry is exp(0) = 1
    # (softmax(x / 1e-3) is exactly one-hot). Not shifted(): its min, fused into this one pass,
    # drops NaN on XLA:CPU. A +inf max makes one NaN, and the row NaN, as z - m would.
    one = (m - m) + 1
    e = jnp.exp(z * one - m)
    start = jnp.asarray(info.eps / 4, z.dtype)
    if axis_name is None:
        return e, jnp.sum(e, axis, keepdims=True, initial=start)
    return e, lax.psum(jnp.sum(e, axis, keepdims=True), axis_name) + start
